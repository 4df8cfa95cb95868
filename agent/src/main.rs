//! `convoy`: the agent daemon, the local dev cluster and the admin CLI in one binary.

use std::process::ExitCode;

use convoy_agent::cli::{self, Cmd};
use convoy_agent::{certs, config, dev, node};
use tracing_subscriber::EnvFilter;

fn init_logging(default: &str) {
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_env("CONVOY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // openraft logs each failed replication RPC to a dead peer (several lines per
    // heartbeat): each of those call sites logs once per interval; the Raft network says
    // per peer what fails, with a count.
    let quiet = convoy_agent::logging::RateLimit::new(convoy_agent::logging::RAFT_LOG_INTERVAL);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(quiet),
        )
        .try_init();
}

/// Fault injection for the integration tests, not an operator setting (so not in the
/// config file or `--help`): `CONVOY_TEST_FSYNC_DELAY_MS=N` makes every fsync/fdatasync of
/// this agent's disk images (data, chunk hashes, activity log) wait N ms first, as a slow
/// disk would; `CONVOY_TEST_FSYNC_FAIL_WHILE=FILE` makes each of them fail with EIO while
/// FILE exists. Read once, at start.
fn test_fault_injection() -> anyhow::Result<()> {
    if let Some(trigger) = std::env::var_os("CONVOY_TEST_FSYNC_FAIL_WHILE") {
        tracing::warn!(
            trigger = %std::path::Path::new(&trigger).display(),
            "CONVOY_TEST_FSYNC_FAIL_WHILE is set: disk image fsyncs fail while that file exists (fault injection for tests)"
        );
        convoy_store::set_test_sync_failure_while(trigger.into());
    }
    const VAR: &str = "CONVOY_TEST_FSYNC_DELAY_MS";
    let Some(value) = std::env::var_os(VAR) else {
        return Ok(());
    };
    let ms: u64 = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{VAR} must be a number of milliseconds"))?;
    tracing::warn!(
        delay_ms = ms,
        "{VAR} is set: every disk image fsync is delayed (fault injection for tests)"
    );
    convoy_store::set_test_sync_delay(std::time::Duration::from_millis(ms));
    Ok(())
}

/// Lets a CLI command whose reader went away (`convoy vm list | head -1`) end quietly, as
/// Unix tools do, instead of panicking in `println!` (Rust ignores SIGPIPE by default).
/// Not for the agent or `dev`, which must outlive a closed terminal.
#[allow(unsafe_code)]
fn die_on_closed_pipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called first thing in main, before any other thread exists, and it installs
    // the default disposition, not a handler.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

fn main() -> ExitCode {
    let cli = cli::parse();
    if !matches!(cli.command, Cmd::Agent { .. } | Cmd::Dev(_)) {
        die_on_closed_pipe();
    }
    let result = match cli.command {
        Cmd::Agent { config } => {
            init_logging("info,openraft=warn");
            dev::die_with_dev_parent();
            config::AgentConfig::load(&config)
                .and_then(|cfg| test_fault_injection().map(|()| cfg))
                .and_then(|cfg| {
                    tokio::runtime::Builder::new_multi_thread()
                        .enable_all()
                        // The sequencer writes to the page cache on runtime workers (a hand-off
                        // to a blocking thread costs more than that I/O); every fsync runs on
                        // the blocking pool, so a slow disk holds no worker. At least two
                        // workers all the same. More workers than cores only add wake-ups:
                        // with 4 on 2 cores, QD32 sync writes ran at 18-19k IOPS, with 2 at
                        // 24k (p50 1.7 -> 1.25 ms).
                        .worker_threads(
                            std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
                        )
                        .thread_name("convoy-agent")
                        .build()
                        .map_err(anyhow::Error::from)
                        .and_then(|rt| rt.block_on(node::run(cfg)))
                })
        }
        Cmd::Dev(args) => {
            init_logging("warn");
            // Single-threaded on purpose: agents are spawned from this thread, and their
            // parent-death signal is tied to the thread that spawned them.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(dev::run(args)))
        }
        Cmd::Cert(cmd) => certs::run(cmd),
        Cmd::Completions { shell } => {
            // Generated into memory first: clap_complete panics on a failed write, and a
            // closed pipe (`| head`) is not an error worth a panic.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cli::command(), "convoy", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(anyhow::Error::from(e).context("writing the completion script"))
                }
                _ => Ok(()),
            }
        }
        remote => {
            init_logging("warn");
            let global = cli.global;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(async {
                        match remote {
                            Cmd::Cluster(c) => cli::cluster(&global, c).await,
                            Cmd::Vm(c) => cli::vm(&global, c).await,
                            Cmd::Cg(c) => cli::cg(&global, c).await,
                            Cmd::Disk(c) => cli::disk(&global, c).await,
                            Cmd::Migrate(c) => cli::migrate::run(&global, c).await,
                            Cmd::Agent { .. }
                            | Cmd::Dev(_)
                            | Cmd::Cert(_)
                            | Cmd::Completions { .. } => Ok(()),
                        }
                    })
                })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! Commands that follow the cluster over time: `--watch` refreshes a view until Ctrl-C,
//! `cg replicate --wait` and `cg sync` show a progress bar until the copy is done.

use std::future::Future;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::Format;
use super::output::Output;
use crate::api::types::{CgView, ReplicaView};
use crate::client::AdminClient;

/// How often a progress bar asks for news.
const POLL: Duration = Duration::from_millis(250);

/// `--watch` for read commands.
#[derive(Args, Debug, Clone, Default)]
pub struct WatchArgs {
    /// Refresh the output until Ctrl-C (with -o json: one JSON document per line).
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Seconds between refreshes with --watch (0.1 to 3600).
    #[arg(long, value_name = "SECS", default_value_t = 2.0, value_parser = parse_interval, requires = "watch")]
    pub interval: f64,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if (0.1..=3600.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} s is out of range: use 0.1 to 3600"))
    }
}

/// Shows `fetch`'s answer every interval until Ctrl-C: redrawn in place on a terminal,
/// appended otherwise, one compact JSON document per line with `-o json`. A failed fetch
/// is shown and retried (an agent that is down is exactly what one watches for).
pub async fn watch<T, F, Fut>(
    args: &WatchArgs,
    out: &Output,
    title: &str,
    mut fetch: F,
    render: impl Fn(&Output, &T) -> Result<()>,
) -> Result<()>
where
    T: Serialize,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let interval = Duration::from_secs_f64(args.interval);
    let redraw = !out.is_json() && std::io::stdout().is_terminal();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let started = Instant::now();
        let result = fetch().await;
        if out.is_json() {
            match result {
                Ok(v) => println!(
                    "{}",
                    serde_json::to_string(&v).context("encoding the answer as JSON")?
                ),
                Err(e) => eprintln!("error: {e:#}"),
            }
        } else {
            if redraw {
                // Clear the screen and home the cursor, as watch(1) does.
                print!("\x1b[2J\x1b[H");
            }
            println!("Every {:.1}s: {title}    {}\n", args.interval, chrono_now());
            match result {
                Ok(v) => render(out, &v)?,
                Err(e) => println!("error: {e:#}"),
            }
            if !redraw {
                println!();
            }
        }
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = tokio::time::sleep(interval.saturating_sub(started.elapsed())) => {}
        }
    }
}

/// Wall-clock time of day (UTC), for the watch header.
fn chrono_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let day = secs % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        day / 3600,
        (day % 3600) / 60,
        day % 60
    )
}

fn bytes_bar(prefix: &str) -> Result<ProgressBar> {
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {percent}% {bytes_per_sec} eta {eta} {msg}",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    Ok(bar)
}

/// `cg replicate --wait`: follows the new copy on `to` until Raft records it
/// `consistent`, with a progress bar of its first sync on a terminal. Returns the group
/// at that moment. Replication goes on whatever happens here (Ctrl-C, `timeout`).
pub async fn wait_replica(
    client: &AdminClient,
    format: Format,
    cg: &str,
    to: u64,
    timeout: Option<Duration>,
) -> Result<CgView> {
    let path = format!("/v1/cgs/{}", super::encode_path(cg));
    let bar = (format == Format::Table)
        .then(|| bytes_bar(&format!("node {to}")))
        .transpose()?;
    let started = Instant::now();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let view: CgView = client.get(&path).await?;
        let replica: &ReplicaView = view
            .replicas
            .iter()
            .find(|r| r.host == to)
            .with_context(|| format!("'{cg}' has no copy on node {to} any more"))?;
        if let Some(bar) = &bar {
            let total = replica.resync_bytes_total.unwrap_or(0);
            let done = replica.resync_bytes_done.unwrap_or(0);
            bar.set_length(total.max(done).max(1));
            bar.set_position(done);
            let phase = replica.phase.as_deref().unwrap_or("-");
            bar.set_message(match &replica.last_error {
                Some(e) => format!("{} / {phase}: {e}", replica.state),
                None => format!("{} / {phase}", replica.state),
            });
        }
        if replica.state == "consistent" {
            if let Some(bar) = &bar {
                bar.finish_with_message("consistent");
            }
            return Ok(view);
        }
        if let Some(limit) = timeout
            && started.elapsed() >= limit
        {
            if let Some(bar) = &bar {
                bar.abandon();
            }
            anyhow::bail!(
                "node {to}'s copy of '{cg}' is not consistent after {} s (state {}, phase {}{}); \
                 replication goes on: follow it with `convoy cg show {cg} --watch`",
                limit.as_secs(),
                replica.state,
                replica.phase.as_deref().unwrap_or("-"),
                replica
                    .last_error
                    .as_ref()
                    .map_or(String::new(), |e| format!(", last error: {e}"))
            );
        }
        tokio::select! {
            _ = &mut ctrl_c => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                anyhow::bail!(
                    "stopped waiting; replication of '{cg}' to node {to} goes on \
                     (`convoy cg show {cg} --watch`)"
                );
            }
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// `cg sync`: runs `sync` (the request that does the whole copy) while a progress bar on
/// a terminal follows the bytes sent, read from the group's status on its primary through
/// `status` — a client of its own: a client's one connection is busy with the sync.
pub async fn with_sync_progress<T>(
    status: AdminClient,
    format: Format,
    cg: &str,
    to: u64,
    compare: bool,
    sync: impl Future<Output = Result<T>>,
) -> Result<T> {
    if format != Format::Table {
        return sync.await;
    }
    let bar = bytes_bar(&format!("node {to}"))?;
    if compare {
        // Compare-delta learns what differs as it goes: no total, so no bar, percentage
        // or ETA, only what was sent and how fast.
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} {spinner} {bytes} sent {bytes_per_sec} {msg}",
            )
            .context("progress bar template")?,
        );
    }
    let path = format!("/v1/cgs/{}", super::encode_path(cg));
    let follow = async {
        loop {
            tokio::time::sleep(POLL).await;
            // Progress is a nicety: a failed status read leaves the bar as it was.
            let Ok(view) = status.get::<CgView>(&path).await else {
                continue;
            };
            let Some(p) = view.sync else { continue };
            if let Some(total) = p.bytes_total {
                bar.set_length(total.max(p.bytes_sent).max(1));
            }
            bar.set_position(p.bytes_sent);
            bar.set_message(if p.compare {
                format!("{} chunks differed so far", p.chunks_sent)
            } else {
                "full copy".to_string()
            });
        }
    };
    let result = tokio::select! {
        result = sync => result,
        () = follow => unreachable!("the progress loop never ends"),
    };
    if result.is_ok() {
        bar.finish_with_message("synced");
    } else {
        bar.abandon();
    }
    result
}

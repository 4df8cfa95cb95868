//! Serves one file as an NBD export, e.g. for fio's `nbd` engine, qemu-io or nbdcopy.
//!
//! ```text
//! cargo run -p convoy-nbd --example serve_file -- disk.img --size 1G --unix /tmp/nbd.sock
//! fio --ioengine=nbd --uri='nbd+unix:///disk?socket=/tmp/nbd.sock' --rw=randwrite --bs=4k ...
//! cargo run -p convoy-nbd --example serve_file -- disk.img --tcp 127.0.0.1:10809
//! ```
//!
//! Options: `--size BYTES` (suffix K, M or G) creates the file if it does not exist;
//! `--name NAME` sets the export name (default `disk`); `--read-only`. Stop with Ctrl-C or
//! SIGTERM: in-flight requests are answered before the server exits. `RUST_LOG=debug` shows
//! connections.

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;

use convoy_nbd::{ExportRegistry, FileDevice, Server};
use tokio::net::{TcpListener, UnixListener};

struct Args {
    image: PathBuf,
    size: Option<u64>,
    unix: Option<PathBuf>,
    tcp: Option<String>,
    name: String,
    read_only: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("bad size {s:?}"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} too large"))
}

fn parse_args() -> Result<Args, String> {
    let usage = "usage: serve_file IMAGE [--size BYTES] (--unix PATH | --tcp ADDR) [--name NAME] [--read-only]";
    let mut it = std::env::args().skip(1);
    let mut args = Args {
        image: PathBuf::new(),
        size: None,
        unix: None,
        tcp: None,
        name: "disk".to_owned(),
        read_only: false,
    };
    let mut image = None;
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{a} needs a value; {usage}"))
        };
        match a.as_str() {
            "--size" => args.size = Some(parse_size(&value()?)?),
            "--unix" => args.unix = Some(PathBuf::from(value()?)),
            "--tcp" => args.tcp = Some(value()?),
            "--name" => args.name = value()?,
            "--read-only" => args.read_only = true,
            "-h" | "--help" => return Err(usage.to_owned()),
            _ if image.is_none() && !a.starts_with("--") => image = Some(PathBuf::from(&a)),
            _ => return Err(format!("unexpected argument {a:?}; {usage}")),
        }
    }
    args.image = image.ok_or(usage)?;
    if args.unix.is_some() == args.tcp.is_some() {
        return Err(format!("give exactly one of --unix and --tcp; {usage}"));
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = parse_args()?;
    let device = match args.size {
        Some(size) if !args.image.exists() => FileDevice::create(&args.image, size)?,
        _ => FileDevice::open(&args.image, args.read_only)?,
    };
    let exports = ExportRegistry::new();
    exports.add(
        &args.name,
        Arc::new(device),
        format!("{}", args.image.display()),
    )?;
    let server = Server::new(exports);
    // Ctrl-C or SIGTERM stop the server gracefully.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                // Without a Ctrl-C handler, wait for SIGTERM alone.
                if r.is_err() {
                    term.recv().await;
                }
            }
            _ = term.recv() => {}
        }
    };
    if let Some(path) = args.unix {
        // A stale socket from an earlier run would make bind fail.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        eprintln!(
            "serving {} as nbd+unix:///{}?socket={}",
            args.image.display(),
            args.name,
            path.display()
        );
        server.serve_unix(listener, shutdown).await;
        let _ = std::fs::remove_file(&path);
    } else if let Some(addr) = args.tcp {
        let listener = TcpListener::bind(&addr).await?;
        eprintln!(
            "serving {} as nbd://{}/{}",
            args.image.display(),
            listener.local_addr()?,
            args.name
        );
        server.serve_tcp(listener, shutdown).await;
    }
    Ok(())
}

//! What operators see: the data plane's `/metrics` with a replica down, the Grafana
//! dashboard against what agents export, the systemd unit (hardening, watchdog) and the
//! README's CLI tour, run as written against a dev cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::data::*;
use common::*;

/// The value of the sample `series` (name with its labels exactly as rendered, or a name
/// and a label subset: every `key="value"` given must be present), summed over matches.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, v)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            *found.get_or_insert(0.0) += v.parse::<f64>().unwrap();
        }
    }
    found
}

/// Families (`# TYPE` lines) a rendering declares, with their type.
fn families(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

/// Every family has a `# HELP` line and no histogram renders as a summary.
fn assert_well_formed(text: &str) {
    for (name, kind) in families(text) {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no # HELP line"
        );
        assert_ne!(
            kind, "summary",
            "{name} renders as a summary, not a histogram"
        );
    }
}

/// Metric names the Grafana dashboard in deploy/ queries (histogram suffixes removed).
fn dashboard_metrics() -> BTreeSet<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana-dashboard.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("dashboard JSON");
    let mut out = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().unwrap();
            for w in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if w.starts_with("convoy_") {
                    let f = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| w.strip_suffix(s))
                        .unwrap_or(w);
                    out.insert(f.to_string());
                }
            }
        }
    }
    out
}

/// One link's figures from one scrape.
#[derive(Debug)]
struct Link {
    last_seq: f64,
    acked: f64,
    lag_writes: f64,
    lag_seconds: f64,
    streaming: f64,
    state: String,
}

fn link(text: &str, cg: &str, replica: &str) -> Option<Link> {
    let l = [("cg", cg), ("replica", replica)];
    let state = ["syncing", "consistent", "inconsistent", "outdated"]
        .into_iter()
        .find(|s| {
            value(
                text,
                "convoy_replication_link_state",
                &[l[0], l[1], ("state", s)],
            ) == Some(1.0)
        })?
        .to_string();
    Some(Link {
        last_seq: value(text, "convoy_group_last_seq", &[l[0]])?,
        acked: value(text, "convoy_replication_acked_seq", &l)?,
        lag_writes: value(text, "convoy_replication_lag_writes", &l)?,
        lag_seconds: value(text, "convoy_replication_lag_seconds", &l)?,
        streaming: value(
            text,
            "convoy_replication_link_phase",
            &[l[0], l[1], ("phase", "streaming")],
        )?,
        state,
    })
}

/// With the replica's agent SIGKILLed while a guest keeps writing, the primary's
/// `/metrics` says so: the link is no longer streaming, its state is the one `cg show`
/// reports, lag in writes is last_seq - acked_seq and grows, lag in seconds grows, the
/// journal holds the replica's writes. NBD requests, bytes and latency are counted per
/// export, a fenced writer's refusal is counted, refusal counters exist at zero from the
/// start, every family has # HELP, no histogram is a summary, and every metric the
/// Grafana dashboard queries is one the agents export.
#[test]
fn metrics_show_a_dead_replica_lagging_and_refusals_counted() {
    let dev = Dev::start(3, &[]);
    wait_for("a leader", Duration::from_secs(10), || dev.leader());
    for id in 1..=3 {
        let text = dev.metrics(id).expect("GET /metrics");
        assert_well_formed(&text);
        for place in ["sequencer", "export", "replica"] {
            assert_eq!(
                value(
                    &text,
                    "convoy_stale_epoch_refused_total",
                    &[("where", place)]
                ),
                Some(0.0),
                "node {id}: stale epochs at {place} not present at zero"
            );
        }
        for reason in ["stale_epoch", "not_a_replica", "storage", "out_of_order"] {
            assert_eq!(
                value(&text, "convoy_replica_refused_total", &[("reason", reason)]),
                Some(0.0),
                "node {id}: replica refusals ({reason}) not present at zero"
            );
        }
        assert_eq!(value(&text, "convoy_disk_open_failures", &[]), Some(0.0));
        let log = std::fs::read_to_string(&dev.node(id).log).unwrap();
        assert!(
            log.contains("agent ready") && log.contains("admin API only"),
            "node {id} did not log where /metrics is served:\n{log}"
        );
    }

    for args in [
        &[
            "vm",
            "create",
            "sim",
            "--host",
            "1",
            "--disk",
            "32MiB",
            "--workload",
            "iops=200,size=4k",
        ][..],
        &["vm", "create", "web", "--host", "1", "--disk", "16MiB"],
        &["cg", "create", "g", "--vm", "sim", "--vm", "web"],
        &["cg", "replicate", "g", "--to", "2", "--mode", "async"],
        &["vm", "start", "sim"],
    ] {
        let r = dev.cli(args);
        assert!(r.ok, "{args:?}: {r:?}");
    }

    // NBD: four 4 KiB writes and one read through web's export.
    let uri = vm_uri(&dev, "web", 0);
    let disk = dev.cli(&["vm", "show", "web", "-o", "json"]).json()["disks"][0]["id"]
        .as_u64()
        .unwrap();
    let export = format!("disk-{disk}");
    qemu_io(
        &uri,
        &[
            "write -P 1 0 4k".into(),
            "write -P 2 4k 4k".into(),
            "write -P 3 8k 4k".into(),
            "write -P 4 12k 4k".into(),
            "read -P 1 0 4k".into(),
        ],
    );
    let text = dev.metrics(1).expect("GET /metrics");
    let e = ("export", export.as_str());
    assert_eq!(
        value(&text, "convoy_nbd_requests_total", &[e, ("op", "write")]),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "convoy_nbd_request_seconds_count",
            &[e, ("op", "write")]
        ),
        Some(4.0)
    );
    assert_eq!(
        value(
            &text,
            "convoy_nbd_bytes_total",
            &[e, ("direction", "write")]
        ),
        Some(16384.0)
    );
    assert!(value(&text, "convoy_nbd_bytes_total", &[e, ("direction", "read")]).unwrap() >= 4096.0);
    assert_eq!(
        value(
            &text,
            "convoy_nbd_request_seconds_bucket",
            &[e, ("op", "write"), ("le", "+Inf")]
        ),
        Some(4.0)
    );

    // A writer that opened the export before a fence is refused, and counted.
    let mut io = Command::new("qemu-io")
        .args(["-f", "raw", &uri])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    use std::io::Write;
    let mut stdin = io.stdin.take().unwrap();
    writeln!(stdin, "write -P 5 0 4k").unwrap();
    wait_for("qemu-io's first write", Duration::from_secs(20), || {
        let t = dev.metrics(1).expect("GET /metrics");
        (value(&t, "convoy_nbd_requests_total", &[e, ("op", "write")]) >= Some(5.0)).then_some(())
    });
    // `cg fence` returns once the sequencer drained writes of the old epoch.
    assert!(dev.cli(&["cg", "fence", "g"]).ok);
    writeln!(stdin, "write -P 6 0 4k").unwrap();
    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    let out = io.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("write failed"),
        "the fenced write passed: {said}"
    );
    let text = dev.metrics(1).expect("GET /metrics");
    let stale = value(&text, "convoy_stale_epoch_refused_total", &[]).unwrap();
    assert!(stale >= 1.0, "stale-epoch refusal not counted:\n{text}");
    assert!(
        value(
            &text,
            "convoy_nbd_request_errors_total",
            &[e, ("op", "write")]
        ) >= Some(1.0),
        "the refused NBD write is not counted as an error"
    );

    // Streaming: the link says so.
    let streaming = wait_for("the link to stream", Duration::from_secs(60), || {
        let t = dev.metrics(1).expect("GET /metrics");
        let l = link(&t, "g", "2")?;
        (l.streaming == 1.0 && l.state == "consistent" && l.acked > 0.0).then_some(t)
    });
    assert!(
        value(
            &streaming,
            "convoy_replication_resyncs_total",
            &[("cg", "g")]
        ) >= Some(1.0)
    );
    assert!(
        value(
            &streaming,
            "convoy_replication_sent_bytes_total",
            &[("cg", "g")]
        ) > Some(0.0)
    );

    // Every metric the dashboard queries is exported by some agent.
    let mut exported = BTreeSet::new();
    for id in 1..=3 {
        exported.extend(
            families(&dev.metrics(id).expect("GET /metrics"))
                .into_iter()
                .map(|(n, _)| n),
        );
    }
    let missing: Vec<String> = dashboard_metrics().difference(&exported).cloned().collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no agent exports: {missing:?}"
    );

    // The replica dies; the guest keeps writing at 200 IOPS. Its sender notices once the
    // QUIC connection times out (3 s without an answer).
    dev.kill(2);
    let (first, text) = wait_for(
        "the link to stop streaming and the replica to lack writes",
        Duration::from_secs(30),
        || {
            let t = dev.metrics(1).expect("GET /metrics");
            let l = link(&t, "g", "2")?;
            (l.streaming == 0.0 && l.lag_writes > 50.0).then_some((l, t))
        },
    );
    eprintln!("with node 2 down, node 1's /metrics:");
    for line in text.lines().filter(|l| {
        l.starts_with("convoy_replication_")
            || l.starts_with("convoy_journal_bytes")
            || l.starts_with("convoy_group_last_seq")
    }) {
        eprintln!("  {line}");
    }
    eprintln!("{}", dev.cli(&["cg", "show", "g"]).stdout);
    assert_eq!(first.lag_writes, first.last_seq - first.acked, "{first:?}");
    assert!(first.lag_seconds > 0.0, "{first:?}");
    assert_eq!(
        value(
            &text,
            "convoy_replication_link_phase",
            &[("cg", "g"), ("phase", "connecting")]
        ),
        Some(1.0),
        "a dead replica's sender is not reconnecting"
    );
    let shown = cg_show(&dev, "g");
    assert_eq!(
        shown["replicas"][0]["state"].as_str(),
        Some(first.state.as_str()),
        "metrics and cg show disagree on the link state"
    );
    assert!(
        value(&text, "convoy_journal_bytes", &[("cg", "g")]) > Some(0.0),
        "the journal holds nothing for the dead replica"
    );
    let later = wait_for("lag_seconds to grow", Duration::from_secs(15), || {
        let l = link(&dev.metrics(1).expect("GET /metrics"), "g", "2")?;
        (l.lag_seconds >= first.lag_seconds + 1.0).then_some(l)
    });
    assert!(
        later.lag_writes > first.lag_writes,
        "{later:?} vs {first:?}"
    );
    assert_eq!(later.lag_writes, later.last_seq - later.acked, "{later:?}");
    dev.assert_no_panics();
}

/// The unit file's `Key=value` lines (comments and sections skipped).
fn unit_settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Runs `systemd-analyze verify` on `unit` (written to `dir`); returns what it said about
/// the unit. Panics with a clear message when systemd-analyze is not installed.
fn systemd_verify(dir: &std::path::Path, unit: &str) -> (bool, String) {
    let path = dir.join("convoy-agent.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "systemd-analyze is not available ({e}): this test checks deploy/convoy-agent.service with it; install the `systemd` package (scripts/setup-debian does)"
            )
        });
    let said: String = String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| l.contains("convoy-agent.service"))
        .map(|l| format!("{l}\n"))
        .collect();
    (out.status.success(), said)
}

/// deploy/convoy-agent.service is hardened (no new privileges, read-only system but for
/// the data and socket directories, no home, a private /tmp, a capability bounding set),
/// has a watchdog, and `systemd-analyze verify` finds nothing wrong with it. A copy with a
/// misspelt key is reported, so the check can fail.
#[test]
fn systemd_unit_is_hardened_has_a_watchdog_and_passes_systemd_analyze_verify() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/convoy-agent.service"
    );
    let unit = std::fs::read_to_string(path).unwrap();
    let settings = unit_settings(&unit);
    let get = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for (key, want) in [
        ("Type", "notify"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ] {
        assert_eq!(get(key), [want], "{key} in {path}");
    }
    let rw = get("ReadWritePaths").join(" ");
    for dir in ["/var/lib/convoy", "/run/convoy"] {
        assert!(
            rw.split_whitespace().any(|d| d == dir),
            "ReadWritePaths lacks {dir}"
        );
    }
    let caps = get("CapabilityBoundingSet");
    assert_eq!(caps.len(), 1, "one CapabilityBoundingSet");
    assert!(!caps[0].contains("CAP_SYS_ADMIN"), "{caps:?}");
    let watchdog: u64 = get("WatchdogSec")
        .first()
        .and_then(|v| v.trim_end_matches('s').parse().ok())
        .expect("WatchdogSec in seconds");
    assert!((5..=120).contains(&watchdog), "WatchdogSec={watchdog}");

    // verify checks that ExecStart's binary exists: point it at the one under test.
    let dir = tempfile::tempdir().unwrap();
    let bin = convoy_bin();
    let local = unit.replace("/usr/local/bin/convoy", &bin.display().to_string());
    assert_ne!(
        local, unit,
        "ExecStart no longer names /usr/local/bin/convoy"
    );
    let (ok, said) = systemd_verify(dir.path(), &local);
    assert!(ok && said.is_empty(), "systemd-analyze verify:\n{said}");
    let broken = local.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes");
    let (_, said) = systemd_verify(dir.path(), &broken);
    assert!(
        said.contains("NoNewPrivilege"),
        "systemd-analyze did not report a misspelt key: {said:?}"
    );
}

/// Datagrams the agent sends to `NOTIFY_SOCKET` within `window`, until `enough` holds.
fn notifications(
    sock: &std::os::unix::net::UnixDatagram,
    window: Duration,
    mut enough: impl FnMut(&[String]) -> bool,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + window;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < deadline && !enough(&got) {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

/// With `WATCHDOG_USEC` set (as systemd sets it for `WatchdogSec`), the agent's main loop
/// sends `WATCHDOG=1` to `NOTIFY_SOCKET` every half period after `READY=1`; when
/// `WATCHDOG_PID` names another process it sends none.
#[test]
fn agent_pings_the_systemd_watchdog_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let notify = path.display().to_string();
    {
        let dev = Dev::start_with_env(
            1,
            &[],
            &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "400000")],
        );
        let got = notifications(&sock, Duration::from_secs(20), |g| {
            g.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 4
        });
        let ready = got.iter().position(|m| m.contains("READY=1"));
        let pings = got.iter().filter(|m| m.contains("WATCHDOG=1")).count();
        assert!(ready.is_some(), "no READY=1: {got:?}");
        assert!(
            pings >= 4,
            "{pings} watchdog pings in 20 s at 0.2 s: {got:?}"
        );
        dev.assert_no_panics();
    }
    // Drain what the stopping agent sent.
    notifications(&sock, Duration::from_millis(300), |_| false);
    let dev = Dev::start_with_env(
        1,
        &[],
        &[
            ("NOTIFY_SOCKET", &notify),
            ("WATCHDOG_USEC", "400000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    let got = notifications(&sock, Duration::from_secs(20), |g| {
        g.iter().any(|m| m.contains("READY=1"))
    });
    assert!(
        got.iter().any(|m| m.contains("READY=1")),
        "no READY=1: {got:?}"
    );
    // Five periods of silence: a ping would have come every 0.2 s.
    let after = notifications(&sock, Duration::from_secs(1), |_| false);
    assert!(
        !got.iter().chain(&after).any(|m| m.contains("WATCHDOG=1")),
        "pinged a watchdog meant for another process: {got:?} {after:?}"
    );
    drop(dev);
}

/// The README's tour: every indented command between its markers, comments removed,
/// continuation lines joined; `export` lines are returned apart.
fn readme_tour() -> (Vec<String>, Vec<String>) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let readme = std::fs::read_to_string(path).unwrap();
    let begin = readme
        .find("<!-- tour:")
        .expect("README.md has no `<!-- tour: ... -->` marker");
    let end = readme
        .find("<!-- tour: end -->")
        .expect("README.md has no `<!-- tour: end -->` marker");
    let mut commands = Vec::new();
    let mut exports = Vec::new();
    let mut pending = String::new();
    for line in readme[begin..end].lines() {
        let Some(code) = line.strip_prefix("    ") else {
            continue;
        };
        // A comment starts at `#` after whitespace (none of the commands holds one).
        let code = match code.find(" #") {
            Some(i) => &code[..i],
            None => code,
        };
        let code = code.trim();
        if code.is_empty() || code.starts_with('#') {
            continue;
        }
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        let full = std::mem::take(&mut pending) + code;
        if let Some(e) = full.strip_prefix("export ") {
            exports.push(e.to_string());
        } else {
            commands.push(full);
        }
    }
    (exports, commands)
}

/// The README's CLI tour runs in order, as written, against a fresh `convoy dev`: every
/// command exits 0. The cluster's directory stands in for `convoy-dev/` and its
/// addresses for the example ones; the tour's `export` lines name exactly the variables
/// `convoy dev` gives.
#[test]
fn readme_tour_runs_in_order_as_written_against_a_dev_cluster() {
    let (exports, commands) = readme_tour();
    assert!(
        commands.len() >= 30,
        "the tour lost commands: {commands:#?}"
    );
    let mut names: Vec<&str> = exports
        .iter()
        .filter_map(|e| e.split_once('=').map(|(k, _)| k))
        .collect();
    names.sort_unstable();
    let dev = Dev::start(3, &[]);
    wait_for("a leader", Duration::from_secs(10), || dev.leader());
    let mut given: Vec<&str> = dev.file.env.keys().map(String::as_str).collect();
    given.sort_unstable();
    assert_eq!(
        names, given,
        "the tour's exports differ from what `convoy dev` prints"
    );

    let dir = format!("{}/", dev.dir.path().display());
    let bin_dir = convoy_bin().parent().unwrap().display().to_string();
    let path = format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default());
    let started = std::time::Instant::now();
    for (i, cmd) in commands.iter().enumerate() {
        let run = cmd.replace("convoy-dev/", &dir);
        let t = std::time::Instant::now();
        let out = Command::new("timeout")
            .args(["-s", "KILL", "120", "bash", "-c", &run])
            .envs(dev.env())
            .env("PATH", &path)
            .env_remove("CONVOY_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("bash");
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        eprintln!("[{i}] {cmd}  ({:.1} s)", t.elapsed().as_secs_f64());
        assert!(
            out.status.success(),
            "README tour step {i} failed ({}): {cmd}\n{said}",
            out.status
        );
    }
    eprintln!(
        "{} commands in {:.1} s",
        commands.len(),
        started.elapsed().as_secs_f64()
    );
    dev.assert_no_panics();
}

/// With `listen.metrics` set, the agent logs the plain-HTTP address at start and serves
/// `/metrics` there without TLS, data-plane families included.
#[test]
fn plain_metrics_listener_is_logged_and_serves_the_data_plane_families() {
    use std::io::{Read, Write};
    let dev = Dev::start(1, &[]);
    wait_for("a leader", Duration::from_secs(10), || dev.leader());
    let addr = std::net::TcpListener::bind((dev.ip, 0))
        .unwrap()
        .local_addr()
        .unwrap();
    dev.kill(1);
    let config = &dev.node(1).config;
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains("[listen]\n"), "{text}");
    let text = text.replacen(
        "[listen]\n",
        &format!("[listen]\nmetrics = \"{addr}\"\n"),
        1,
    );
    std::fs::write(config, text).unwrap();
    dev.restart(1);

    let log = std::fs::read_to_string(&dev.node(1).log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("over plain HTTP") && l.contains(&addr.to_string())),
        "the plain metrics listener was not logged with its address:\n{log}"
    );
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for family in [
        "# TYPE convoy_replication_lag_writes gauge",
        "# TYPE convoy_stale_epoch_refused_total counter",
        "# TYPE convoy_disk_open_failures gauge",
    ] {
        assert!(answer.contains(family), "no `{family}` in:\n{answer}");
    }
}

//! A small typed client for QEMU's machine protocol (QMP) over its Unix socket.
//!
//! One [`Monitor`] owns the one connection a QEMU allows on its QMP socket: a task reads
//! every line, answers commands in the order they were sent (QMP answers in order) and
//! turns asynchronous events (`STOP`, `RESUME`, `SHUTDOWN`, `MIGRATION`, ...) into the
//! monitor's [`MonitorState`]. (The `qapi` crates were looked at: their async client is
//! built on an older tokio codec stack and their generated types are far larger than the
//! few commands Convoy sends.)

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

/// How many recent events a monitor keeps (for `vm show`).
const KEPT_EVENTS: usize = 16;

/// What can go wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be opened or broke.
    #[error("QMP socket {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// QEMU said something that is not QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU refused the command.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer in time.
    #[error("QEMU did not answer {0} in time")]
    Timeout(String),
    /// The connection is closed (QEMU exited or closed the monitor).
    #[error("the QMP connection is closed")]
    Closed,
}

/// An asynchronous QMP event, typed for the ones Convoy acts on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QmpEvent {
    /// The guest's CPUs stopped (paused, or before a migration's switchover).
    Stop,
    /// The guest's CPUs run again.
    Resume,
    /// The guest shut down (`guest`: it asked for it itself); with `-no-shutdown` QEMU
    /// keeps running.
    Shutdown {
        /// Whether the guest initiated it.
        guest: bool,
        /// QEMU's reason.
        reason: String,
    },
    /// A migration changed status.
    Migration {
        /// The new status (`setup`, `active`, `pre-switchover`, `completed`, `failed`...).
        status: String,
    },
    /// Any other event, by name.
    Other(String),
}

impl QmpEvent {
    fn parse(name: &str, data: &Value) -> QmpEvent {
        let text = |k: &str| {
            data.get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        match name {
            "STOP" => QmpEvent::Stop,
            "RESUME" => QmpEvent::Resume,
            "SHUTDOWN" => QmpEvent::Shutdown {
                guest: data.get("guest").and_then(Value::as_bool).unwrap_or(false),
                reason: text("reason"),
            },
            "MIGRATION" => QmpEvent::Migration {
                status: text("status"),
            },
            other => QmpEvent::Other(other.to_string()),
        }
    }

    /// A short description for `vm show`.
    pub fn describe(&self) -> String {
        match self {
            QmpEvent::Stop => "STOP".into(),
            QmpEvent::Resume => "RESUME".into(),
            QmpEvent::Shutdown { guest, reason } => {
                format!(
                    "SHUTDOWN ({reason}{})",
                    if *guest { ", by the guest" } else { "" }
                )
            }
            QmpEvent::Migration { status } => format!("MIGRATION ({status})"),
            QmpEvent::Other(name) => name.clone(),
        }
    }
}

/// What the monitor knows from events, without asking QEMU.
#[derive(Clone, Debug, Default)]
pub struct MonitorState {
    /// The connection is open.
    pub connected: bool,
    /// Why it closed, if it did.
    pub closed_because: Option<String>,
    /// Whether a `SHUTDOWN` event came.
    pub shut_down: bool,
    /// Whether the CPUs are stopped according to the last `STOP`/`RESUME`.
    pub stopped: bool,
    /// Last migration status from a `MIGRATION` event.
    pub migration: Option<String>,
    /// When that event came (this process's clock).
    pub migration_since: Option<std::time::Instant>,
    /// When the last `STOP` event happened, by QEMU's stamp (wall clock, microseconds
    /// since the Unix epoch).
    pub stopped_at_unix_us: Option<u64>,
    /// The latest events, oldest first.
    pub events: VecDeque<QmpEvent>,
}

/// An event's `timestamp` (QEMU stamps events with the host's wall clock), in
/// microseconds since the Unix epoch.
fn event_unix_us(event: &Value) -> Option<u64> {
    let ts = event.get("timestamp")?;
    let seconds = ts.get("seconds")?.as_u64()?;
    let micros = ts.get("microseconds")?.as_u64()?;
    seconds.checked_mul(1_000_000)?.checked_add(micros)
}

/// `query-status`.
#[derive(Clone, Debug, Deserialize)]
pub struct StatusInfo {
    /// Whether the guest's CPUs run.
    pub running: bool,
    /// QEMU's run state (`running`, `paused`, `shutdown`, `inmigrate`, `postmigrate`...).
    pub status: String,
}

struct Call {
    line: String,
    reply: oneshot::Sender<Result<Value, QmpError>>,
}

/// A connected QMP monitor. Cheap to clone; the connection closes when QEMU closes it.
#[derive(Clone)]
pub struct Monitor {
    calls: mpsc::Sender<Call>,
    state: Arc<Mutex<MonitorState>>,
    /// Counts the events received, so a caller can wait for the next one.
    events: watch::Receiver<u64>,
}

/// Wakes its holder on the monitor's next event (see [`Monitor::events`]).
pub struct EventWatch(watch::Receiver<u64>);

impl EventWatch {
    /// Waits for an event after this watch was made (or the last wait), at most `timeout`;
    /// returns whether one came.
    pub async fn next(&mut self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, self.0.changed()).await,
            Ok(Ok(()))
        )
    }
}

impl Monitor {
    /// Connects to the QMP socket at `path`, reads the greeting and leaves capability
    /// negotiation; within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Monitor, QmpError> {
        let shown = path.display().to_string();
        tokio::time::timeout(timeout, Self::connect_inner(path, shown.clone()))
            .await
            .map_err(|_| QmpError::Timeout(format!("the greeting on {shown}")))?
    }

    async fn connect_inner(path: &Path, shown: String) -> Result<Monitor, QmpError> {
        let io = |source| QmpError::Io {
            path: shown.clone(),
            source,
        };
        let stream = UnixStream::connect(path).await.map_err(io)?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = lines
            .next_line()
            .await
            .map_err(io)?
            .ok_or(QmpError::Closed)?;
        let greeting: Value = serde_json::from_str(&greeting)
            .map_err(|e| QmpError::Protocol(format!("greeting {greeting:?}: {e}")))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("no QMP greeting: {greeting}")));
        }
        write
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .await
            .map_err(io)?;
        loop {
            let line = lines
                .next_line()
                .await
                .map_err(io)?
                .ok_or(QmpError::Closed)?;
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| QmpError::Protocol(format!("{line:?}: {e}")))?;
            if v.get("return").is_some() {
                break;
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Protocol(format!("qmp_capabilities refused: {e}")));
            }
        }
        let state = Arc::new(Mutex::new(MonitorState {
            connected: true,
            ..MonitorState::default()
        }));
        let (calls, rx) = mpsc::channel(16);
        let (events_tx, events) = watch::channel(0);
        tokio::spawn(run(lines, write, rx, Arc::clone(&state), events_tx));
        Ok(Monitor {
            calls,
            state,
            events,
        })
    }

    /// A watch that wakes on events that come after this call.
    pub fn events(&self) -> EventWatch {
        let mut rx = self.events.clone();
        rx.mark_unchanged();
        EventWatch(rx)
    }

    /// What events said so far.
    pub fn state(&self) -> MonitorState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs `command` with `arguments`, waiting at most `timeout` for the answer.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let (reply, answer) = oneshot::channel();
        self.calls
            .send(Call {
                line: format!("{msg}\n"),
                reply,
            })
            .await
            .map_err(|_| QmpError::Closed)?;
        match tokio::time::timeout(timeout, answer).await {
            Err(_) => Err(QmpError::Timeout(command.to_string())),
            Ok(Err(_)) => Err(QmpError::Closed),
            Ok(Ok(Err(QmpError::Refused { class, desc, .. }))) => Err(QmpError::Refused {
                command: command.to_string(),
                class,
                desc,
            }),
            Ok(Ok(r)) => r,
        }
    }

    /// `query-status`.
    pub async fn query_status(&self, timeout: Duration) -> Result<StatusInfo, QmpError> {
        let v = self.execute("query-status", None, timeout).await?;
        serde_json::from_value(v).map_err(|e| QmpError::Protocol(format!("query-status: {e}")))
    }

    /// `system_powerdown`: an ACPI power button press (the guest may ignore it).
    pub async fn system_powerdown(&self, timeout: Duration) -> Result<(), QmpError> {
        self.execute("system_powerdown", None, timeout)
            .await
            .map(drop)
    }

    /// `quit`: QEMU exits at once.
    pub async fn quit(&self, timeout: Duration) -> Result<(), QmpError> {
        match self.execute("quit", None, timeout).await {
            // QEMU may close the socket before its answer is read.
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `stop`: pause the guest's CPUs.
    pub async fn stop(&self, timeout: Duration) -> Result<(), QmpError> {
        self.execute("stop", None, timeout).await.map(drop)
    }

    /// `cont`: resume the guest's CPUs.
    pub async fn cont(&self, timeout: Duration) -> Result<(), QmpError> {
        self.execute("cont", None, timeout).await.map(drop)
    }

    /// Waits until the connection closes (QEMU exited) or `timeout` passes; returns
    /// whether it closed.
    pub async fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.state().connected {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The connection's task: sends calls, matches answers in order, records events.
async fn run(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    mut write: tokio::net::unix::OwnedWriteHalf,
    mut calls: mpsc::Receiver<Call>,
    state: Arc<Mutex<MonitorState>>,
    events: watch::Sender<u64>,
) {
    let mut waiting: VecDeque<oneshot::Sender<Result<Value, QmpError>>> = VecDeque::new();
    let why = loop {
        tokio::select! {
            call = calls.recv() => {
                // Every Monitor clone is gone: nobody can ask any more, but events
                // still matter to no one either.
                let Some(call) = call else { break "the monitor was dropped".to_string() };
                if let Err(e) = write.write_all(call.line.as_bytes()).await {
                    let _ = call.reply.send(Err(QmpError::Closed));
                    break format!("write: {e}");
                }
                waiting.push_back(call.reply);
            }
            line = lines.next_line() => {
                let line = match line {
                    Ok(Some(l)) => l,
                    Ok(None) => break "QEMU closed the connection".to_string(),
                    Err(e) => break format!("read: {e}"),
                };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    tracing::warn!(line, "QEMU sent a line that is not JSON");
                    continue;
                };
                if let Some(name) = v.get("event").and_then(Value::as_str) {
                    let event = QmpEvent::parse(name, v.get("data").unwrap_or(&Value::Null));
                    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                    match &event {
                        QmpEvent::Stop => {
                            s.stopped = true;
                            s.stopped_at_unix_us = event_unix_us(&v);
                        }
                        QmpEvent::Resume => s.stopped = false,
                        QmpEvent::Shutdown { .. } => s.shut_down = true,
                        QmpEvent::Migration { status } => {
                            s.migration = Some(status.clone());
                            s.migration_since = Some(std::time::Instant::now());
                        }
                        QmpEvent::Other(_) => {}
                    }
                    s.events.push_back(event);
                    while s.events.len() > KEPT_EVENTS {
                        s.events.pop_front();
                    }
                    drop(s);
                    events.send_modify(|n| *n += 1);
                    continue;
                }
                let answer = if let Some(r) = v.get("return") {
                    Ok(r.clone())
                } else if let Some(e) = v.get("error") {
                    let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                    Err(QmpError::Refused {
                        command: String::new(),
                        class: text("class"),
                        desc: text("desc"),
                    })
                } else {
                    tracing::warn!(line, "QEMU sent an unexpected QMP message");
                    continue;
                };
                if let Some(reply) = waiting.pop_front() {
                    let _ = reply.send(answer);
                }
            }
        }
    };
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    s.connected = false;
    s.closed_because = Some(why);
}

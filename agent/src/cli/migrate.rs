//! `convoy migrate`: plan, start, watch, list, show and abort migrations.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::output::Output;
use super::{Format, GlobalArgs, ReadArgs, read_query};
use crate::api::types::*;
use crate::client::AdminClient;
use crate::units::format_size;
use convoy_raft::model::LiveSettings;

#[derive(Subcommand, Debug)]
pub enum MigrateCmd {
    /// Check that a migration can work and estimate what it moves and how long it takes
    /// (changes nothing).
    Plan {
        /// The group.
        cg: String,
        /// Destination host.
        #[arg(long)]
        to: u64,
        /// reverse-replication (default), sync-switch, compare-delta or break-consistency.
        #[arg(long)]
        strategy: Option<String>,
    },
    /// Start moving every VM of a group to another host; prints the migration id.
    Start {
        /// The group.
        cg: String,
        /// Destination host.
        #[arg(long)]
        to: u64,
        /// reverse-replication, sync-switch, compare-delta or break-consistency.
        #[arg(long)]
        strategy: String,
        /// For sync-switch: active-active (default) or active-passive.
        #[arg(long, value_name = "MODE")]
        sync_mode: Option<String>,
        /// Fail back if not decided in time, e.g. 90s, 10m, 1h (default 10m).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        deadline: Option<Duration>,
        /// Wait for the decision, showing progress (exit 1 unless committed).
        #[arg(long)]
        wait: bool,
        /// Running QEMU guests: QEMU's downtime limit, ms (default: the source host's
        /// [qemu] migrate_downtime_limit_ms).
        #[arg(long, value_name = "MS")]
        downtime_limit_ms: Option<u64>,
        /// Running QEMU guests: QEMU's bandwidth cap, MiB/s, 0 for QEMU's default
        /// (default: the source host's [qemu] migrate_max_bandwidth_mib).
        #[arg(long, value_name = "MIB")]
        max_bandwidth_mib: Option<u64>,
        /// Running QEMU guests: QEMU's auto-converge, true or false (default: the source
        /// host's [qemu] migrate_auto_converge).
        #[arg(long, value_name = "BOOL")]
        auto_converge: Option<bool>,
    },
    /// Phase and progress of a migration; with --watch, live until it is decided.
    Status {
        /// Migration id.
        id: u64,
        /// Follow it until the decision (exit 1 unless committed).
        #[arg(long)]
        watch: bool,
    },
    /// List migrations.
    List(ReadArgs),
    /// A migration's report: timeline, bytes, stun per VM, RPO, decision and root hashes.
    Show {
        /// Migration id.
        id: u64,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Fail a running migration back: every VM returns to the source.
    Abort {
        /// Migration id.
        id: u64,
    },
}

/// Parses `90s`, `10m`, `1h` or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = t
        .find(|c: char| !c.is_ascii_digit())
        .map_or((t, "s"), |i| (&t[..i], &t[i..]));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a duration: use e.g. 90s, 10m or 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        other => return Err(format!("unit '{other}' in '{text}': use s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

/// Runs a migrate command.
pub async fn run(global: &GlobalArgs, cmd: MigrateCmd) -> Result<()> {
    let client = global.client()?;
    let out = Output::new(global.output);
    match cmd {
        MigrateCmd::Plan { cg, to, strategy } => {
            let req = PlanMigrationRequest { cg, to, strategy };
            let plan: MigrationPlanView = client.post("/v1/migrations/plan", &req).await?;
            out.migration_plan(&plan)?;
            if !plan.ok {
                anyhow::bail!("the migration cannot start: {}", plan.problems.join("; "));
            }
            Ok(())
        }
        MigrateCmd::Start {
            cg,
            to,
            strategy,
            sync_mode,
            deadline,
            wait,
            downtime_limit_ms,
            max_bandwidth_mib,
            auto_converge,
        } => {
            let req = StartMigrationRequest {
                cg,
                to,
                strategy,
                sync_mode,
                deadline_secs: deadline.map(|d| d.as_secs()),
                live: LiveSettings {
                    downtime_limit_ms,
                    max_bandwidth_mib,
                    auto_converge,
                },
            };
            let m: MigrationView = client.post("/v1/migrations", &req).await?;
            if wait {
                if global.output == Format::Table {
                    println!("migration {} started", m.id);
                }
                watch(&client, &out, m.id, global.output).await
            } else {
                out.migration_started(&m)
            }
        }
        MigrateCmd::Status { id, watch: follow } => {
            if follow {
                watch(&client, &out, id, global.output).await
            } else {
                let m: MigrationView = client.get(&format!("/v1/migrations/{id}")).await?;
                out.migration_status(&m)
            }
        }
        MigrateCmd::List(r) => {
            let list: Vec<MigrationView> = client
                .get(&format!("/v1/migrations{}", read_query(&r)))
                .await?;
            out.migrations(&list)
        }
        MigrateCmd::Show { id, read } => {
            let m: MigrationView = client
                .get(&format!("/v1/migrations/{id}{}", read_query(&read)))
                .await?;
            out.migration_report(&m)
        }
        MigrateCmd::Abort { id } => {
            let m: MigrationView = client
                .post(
                    &format!("/v1/migrations/{id}/abort"),
                    &serde_json::json!({}),
                )
                .await?;
            out.migration_status(&m)
        }
    }
}

/// Follows a migration until its decision: progress bars on a terminal, the final record
/// as JSON with `-o json`. Fails unless it committed.
async fn watch(client: &AdminClient, out: &Output, id: u64, format: Format) -> Result<()> {
    let bars = (format == Format::Table).then(MultiProgress::new);
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
    )
    .context("progress bar template")?
    .progress_chars("=> ");
    let mut group: Option<ProgressBar> = None;
    let mut vm_bars: Vec<(String, ProgressBar)> = Vec::new();
    let mut last_phase = String::new();
    let final_view = loop {
        let m: MigrationView = client.get(&format!("/v1/migrations/{id}")).await?;
        if let Some(multi) = &bars {
            let g = group.get_or_insert_with(|| {
                let b = multi.add(ProgressBar::new(m.bytes_needed.max(1)));
                b.set_style(style.clone());
                b.set_prefix(m.cg.clone());
                b
            });
            g.set_length(m.bytes_needed.max(m.bytes_moved).max(1));
            g.set_position(m.bytes_moved);
            g.set_message(format!(
                "{}{}",
                m.phase,
                m.note.as_ref().map_or(String::new(), |n| format!(": {n}"))
            ));
            if vm_bars.is_empty() {
                for vm in &m.vms {
                    let b = multi.add(ProgressBar::new(1));
                    b.set_style(
                        ProgressStyle::with_template("{prefix:>12} {msg}")
                            .context("progress bar template")?,
                    );
                    b.set_prefix(vm.clone());
                    vm_bars.push((vm.clone(), b));
                }
            }
            for (vm, b) in &vm_bars {
                let stun = m.stun_ms.iter().find(|(v, _)| v == vm).map(|(_, s)| *s);
                let msg = if m.moved.contains(vm) {
                    format!(
                        "on node {}{}",
                        m.to,
                        stun.map_or(String::new(), |s| format!(" (stun {s} ms)"))
                    )
                } else {
                    format!("on node {}", m.from)
                };
                b.set_message(msg);
            }
            if m.phase != last_phase {
                multi.println(format!("{:>8.1}s  {}", m.elapsed_secs, m.phase))?;
                last_phase = m.phase.clone();
            }
        }
        if m.decision.is_some() {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if let Some(g) = &group {
        g.finish();
    }
    for (_, b) in &vm_bars {
        b.finish();
    }
    out.migration_report(&final_view)?;
    match final_view.decision.as_deref() {
        Some("committed") => Ok(()),
        other => anyhow::bail!(
            "migration {id} ended {}: {}",
            other.unwrap_or("undecided"),
            final_view.decision_reason.unwrap_or_default()
        ),
    }
}

impl Output {
    /// `migrate plan`.
    pub fn migration_plan(&self, p: &MigrationPlanView) -> Result<()> {
        if self.is_json() {
            return self.print_json(p);
        }
        println!(
            "migrate '{}' from node {} to node {} ({}): {}",
            p.cg,
            p.from,
            p.to,
            p.strategy,
            if p.ok { "can start" } else { "CANNOT start" }
        );
        for problem in &p.problems {
            println!("  - {problem}");
        }
        println!(
            "destination copy: {}   free there: {}",
            p.destination_copy,
            format_size(p.destination_free_bytes)
        );
        let link = match p.measured_link_bytes_per_sec {
            Some(rate) => format!("{}/s measured", format_size(rate)),
            None => format!(
                "{}/s assumed (the link could not be measured)",
                format_size(p.assumed_link_bytes_per_sec)
            ),
        };
        println!(
            "to move: about {}   guests write {:.0}/s   estimate: {:.1} s at {link}",
            format_size(p.bytes_to_move),
            p.dirty_writes_per_sec,
            p.estimated_secs,
        );
        Ok(())
    }

    /// `migrate start` without `--wait`.
    pub fn migration_started(&self, m: &MigrationView) -> Result<()> {
        if self.is_json() {
            return self.print_json(m);
        }
        println!("{}", m.id);
        Ok(())
    }

    /// `migrate status`.
    pub fn migration_status(&self, m: &MigrationView) -> Result<()> {
        if self.is_json() {
            return self.print_json(m);
        }
        println!(
            "migration {} of '{}': node {} -> node {} ({})   phase: {}{}   coordinator: node {} (claim {})",
            m.id,
            m.cg,
            m.from,
            m.to,
            m.strategy,
            m.phase,
            m.failing_back_because
                .as_ref()
                .map_or(String::new(), |c| format!(" ({c})")),
            m.coordinator,
            m.claim
        );
        println!(
            "moved {}/{} VMs   bytes {} of {}   elapsed {:.1} s{}",
            m.moved.len(),
            m.vms.len(),
            format_size(m.bytes_moved),
            format_size(m.bytes_needed),
            m.elapsed_secs,
            m.decision
                .as_ref()
                .map_or(String::new(), |d| format!("   decided: {d}"))
        );
        if let Some(n) = &m.note {
            println!("now: {n}");
        }
        Ok(())
    }

    /// `migrate list`.
    pub fn migrations(&self, list: &[MigrationView]) -> Result<()> {
        if self.is_json() {
            return self.print_json(list);
        }
        let mut t = super::output::table(&[
            "ID", "GROUP", "FROM", "TO", "STRATEGY", "PHASE", "DECISION", "TIME (s)",
        ]);
        for m in list {
            t.add_row(vec![
                m.id.to_string(),
                m.cg.clone(),
                m.from.to_string(),
                m.to.to_string(),
                m.strategy.clone(),
                m.phase.clone(),
                m.decision.clone().unwrap_or_else(|| "-".into()),
                format!("{:.1}", m.elapsed_secs),
            ]);
        }
        println!("{t}");
        Ok(())
    }

    /// `migrate show`: the report.
    pub fn migration_report(&self, m: &MigrationView) -> Result<()> {
        if self.is_json() {
            return self.print_json(m);
        }
        self.migration_status(m)?;
        if let Some(r) = &m.decision_reason {
            println!("decision: {} ({r})", m.decision.as_deref().unwrap_or("-"));
        }
        let mut t = super::output::table(&["TIME (s)", "PHASE", "NODE", "WHAT"]);
        for e in &m.timeline {
            t.add_row(vec![
                format!("{:.2}", e.at_secs),
                e.phase.clone(),
                e.node.to_string(),
                e.note.clone(),
            ]);
        }
        println!("{t}");
        if !m.stun_ms.is_empty() {
            let stuns: Vec<String> = m
                .stun_ms
                .iter()
                .map(|(vm, ms)| format!("{vm} {ms} ms"))
                .collect();
            println!("stun: {}", stuns.join(", "));
        }
        for l in &m.live_moves {
            println!(
                "live migration of {}: downtime {} ms, total {} ms, {} of memory sent",
                l.vm,
                l.downtime_ms,
                l.total_ms,
                format_size(l.ram_bytes)
            );
        }
        let live = &m.live;
        if live.downtime_limit_ms.is_some()
            || live.max_bandwidth_mib.is_some()
            || live.auto_converge.is_some()
        {
            let or_host = |v: Option<String>| v.unwrap_or_else(|| "host's".into());
            println!(
                "QEMU settings: downtime limit {}, bandwidth {}, auto-converge {}",
                or_host(live.downtime_limit_ms.map(|ms| format!("{ms} ms"))),
                or_host(live.max_bandwidth_mib.map(|b| if b == 0 {
                    "QEMU's default".to_string()
                } else {
                    format!("{b} MiB/s")
                })),
                or_host(live.auto_converge.map(|b| b.to_string()))
            );
        }
        println!(
            "fail-back copy lag (RPO), worst seen: {} writes",
            m.rpo_writes
        );
        for r in &m.roots {
            println!(
                "disk {}: source {} destination {}",
                r.disk,
                r.source.as_deref().map_or("-", |s| &s[..16.min(s.len())]),
                &r.destination[..16.min(r.destination.len())]
            );
        }
        Ok(())
    }
}

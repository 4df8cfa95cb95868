//! Rendering of command results: comfy-table for people, pretty JSON for scripts.

use anyhow::Result;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use serde::Serialize;

use super::Format;
use crate::api::types::*;
use crate::units::format_size;

/// Prints results in the chosen format.
pub struct Output {
    format: Format,
}

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    t
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

impl Output {
    /// An output in `format`.
    pub fn new(format: Format) -> Self {
        Self { format }
    }

    fn json<T: Serialize + ?Sized>(&self, v: &T) -> Result<()> {
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(())
    }

    /// Whether output is JSON.
    pub fn is_json(&self) -> bool {
        self.format == Format::Json
    }

    /// Prints `v` as pretty JSON.
    pub fn print_json<T: Serialize + ?Sized>(&self, v: &T) -> Result<()> {
        self.json(v)
    }

    /// A confirmation without data.
    pub fn done(&self, message: &str) -> Result<()> {
        match self.format {
            Format::Json => self.json(&serde_json::json!({ "ok": true, "message": message })),
            Format::Table => {
                println!("{message}");
                Ok(())
            }
        }
    }

    /// A confirmation followed by the state the command left: JSON gets the state under
    /// `key` beside `ok` and `message`; people get the message, then the state as `show`
    /// prints it.
    pub fn done_with<T: Serialize + ?Sized>(
        &self,
        message: &str,
        key: &str,
        state: &T,
        show: impl FnOnce(&Self, &T) -> Result<()>,
    ) -> Result<()> {
        match self.format {
            Format::Json => {
                let mut v = serde_json::json!({ "ok": true, "message": message });
                v[key] = serde_json::to_value(state)?;
                self.json(&v)
            }
            Format::Table => {
                println!("{message}");
                show(self, state)
            }
        }
    }

    /// `cluster status`.
    pub fn cluster_status(&self, s: &ClusterStatus) -> Result<()> {
        if self.format == Format::Json {
            return self.json(s);
        }
        let mut t = table(&[
            "NODE",
            "ROLE",
            "VOTER",
            "REACHABLE",
            "MATCHED",
            "RAFT ADDR",
            "ADMIN ADDR",
        ]);
        for n in &s.nodes {
            t.add_row(vec![
                n.id.to_string(),
                n.role.clone(),
                if n.voter { "yes" } else { "no" }.to_string(),
                if n.reachable { "yes" } else { "NO" }.to_string(),
                opt(n.matched_index),
                n.raft_addr.clone(),
                n.admin_addr.clone(),
            ]);
        }
        println!("{t}");
        println!(
            "leader: {}   term: {}   commit: {}   applied: {}   answered by node {}",
            opt(s.leader),
            s.term,
            s.commit_index,
            s.applied_index,
            s.answered_by
        );
        if let Some(w) = &s.warning {
            println!("warning: {w}");
        }
        for f in &s.disk_failures {
            println!(
                "disk {} on node {} cannot be used: {}",
                f.disk, f.node, f.reason
            );
        }
        Ok(())
    }

    /// `cluster node`.
    pub fn node_status(&self, s: &NodeStatus) -> Result<()> {
        if self.format == Format::Json {
            return self.json(s);
        }
        let mut t = table(&["FIELD", "VALUE"]);
        let rows = [
            ("node", s.id.to_string()),
            ("state", s.state.clone()),
            ("term", s.term.to_string()),
            ("leader", opt(s.leader)),
            ("last log index", s.last_log_index.to_string()),
            ("commit index", s.commit_index.to_string()),
            ("applied index", s.applied_index.to_string()),
            ("snapshot index", opt(s.snapshot_index)),
            ("purged index", opt(s.purged_index)),
            (
                "log entries / fsyncs",
                format!("{} / {}", s.log_entries, s.log_fsyncs),
            ),
        ];
        for (k, v) in rows {
            t.add_row(vec![k.to_string(), v]);
        }
        println!("{t}");
        Ok(())
    }

    /// `vm list`.
    pub fn vms(&self, vms: &[VmView]) -> Result<()> {
        if self.format == Format::Json {
            return self.json(vms);
        }
        let mut t = table(&["NAME", "HOST", "DISKS", "SIZE", "CG", "STATE"]);
        for vm in vms {
            let total: u64 = vm.disks.iter().map(|d| d.size).sum();
            t.add_row(vec![
                vm.name.clone(),
                vm.host.to_string(),
                vm.disks.len().to_string(),
                format_size(total),
                opt(vm.cg.as_ref()),
                if vm.running { "running" } else { "stopped" }.to_string(),
            ]);
        }
        println!("{t}");
        println!("{} VM(s)", vms.len());
        Ok(())
    }

    /// `vm show` / `vm create`.
    pub fn vm(&self, vm: &VmView) -> Result<()> {
        if self.format == Format::Json {
            return self.json(vm);
        }
        println!(
            "VM {} (id {}) runs on node {}   cg: {}   {}{}",
            vm.name,
            vm.id,
            vm.host,
            opt(vm.cg.as_ref()),
            if vm.running { "running" } else { "stopped" },
            match vm.state.as_deref() {
                Some("failed") => "   disks: FAILED on its host".to_string(),
                Some(s) => format!("   disks: {s}"),
                None => String::new(),
            }
        );
        if vm.sequencer != vm.host && vm.sequencer != 0 {
            println!(
                "writes are ordered by node {} (mirrored from node {})",
                vm.sequencer, vm.host
            );
        } else {
            println!("writes are ordered by node {} (its own host)", vm.host);
        }
        if vm.stays.len() > 1 {
            let stays: Vec<String> = vm.stays.iter().map(|h| h.to_string()).collect();
            println!("ran on nodes: {}", stays.join(" -> "));
        }
        if let Some(w) = &vm.workload {
            println!(
                "workload: {w}   guest: {}",
                vm.guest
                    .as_deref()
                    .unwrap_or("unknown (host did not answer)")
            );
        }
        if let Some(e) = &vm.guest_error {
            // The guest's own error may already say so.
            let e = e.strip_prefix("guest cannot start: ").unwrap_or(e);
            println!("guest cannot start: {e}");
        }
        if let Some(q) = &vm.qemu {
            let s = &q.spec;
            println!(
                "driver: qemu   memory: {} MiB   cpus: {}   accel: {}",
                s.memory_mib, s.cpus, s.accel
            );
            if let Some(k) = &s.kernel {
                println!(
                    "kernel: {k}   initrd: {}   append: {}",
                    opt(s.initrd.as_ref()),
                    opt(s.append.as_ref())
                );
            }
            match &q.status {
                Some(st) => {
                    println!(
                        "qemu: {}   pid: {}   qmp: {}   status: {}{}{}",
                        st.state,
                        st.pid.map_or("-".to_string(), |p| p.to_string()),
                        st.qmp,
                        st.qmp_status.as_deref().unwrap_or("-"),
                        st.accel
                            .as_ref()
                            .map_or(String::new(), |a| format!("   running with {a}")),
                        if st.adopted { "   (re-attached)" } else { "" }
                    );
                    println!("serial console: {}", st.serial_log);
                    if let Some(e) = &st.error {
                        println!("qemu cannot start: {e}");
                    }
                    if !st.events.is_empty() {
                        println!("qmp events: {}", st.events.join(", "));
                    }
                }
                None => println!("qemu: unknown (node {} did not answer)", vm.host),
            }
        }
        for (disk, why) in &vm.disk_errors {
            println!("disk {disk} cannot be opened on node {}: {why}", vm.host);
        }
        let mut t = table(&["DISK", "ID", "SIZE", "EPOCH", "NBD"]);
        for d in &vm.disks {
            t.add_row(vec![
                d.index.to_string(),
                d.id.to_string(),
                format_size(d.size),
                d.epoch.to_string(),
                if d.uris.is_empty() {
                    "-".to_string()
                } else {
                    d.uris.join("\n")
                },
            ]);
        }
        println!("{t}");
        Ok(())
    }

    /// `cg list`.
    pub fn cgs(&self, cgs: &[CgView]) -> Result<()> {
        if self.format == Format::Json {
            return self.json(cgs);
        }
        let mut t = table(&["NAME", "VMS", "PRIMARY", "SEQUENCER", "REPLICAS"]);
        for cg in cgs {
            t.add_row(vec![
                cg.name.clone(),
                cg.vms.join(","),
                cg.primary.to_string(),
                cg.sequencer.to_string(),
                replicas(cg),
            ]);
        }
        println!("{t}");
        println!("{} group(s)", cgs.len());
        Ok(())
    }

    /// `cg show` / `cg create`.
    pub fn cg(&self, cg: &CgView) -> Result<()> {
        if self.format == Format::Json {
            return self.json(cg);
        }
        println!(
            "consistency group {} (id {})   primary (sequencer): node {}   sequencer epoch: {}   last seq: {}",
            cg.name,
            cg.id,
            cg.sequencer,
            cg.sequencer_epoch,
            opt(cg.last_seq)
        );
        let mut v = table(&["VM", "RUNS ON", "DISK", "EPOCH"]);
        for (name, host) in &cg.vm_hosts {
            for (disk, _, epoch) in cg.disk_epochs.iter().filter(|(_, vm, _)| vm == name) {
                v.add_row(vec![
                    name.clone(),
                    format!("node {host}"),
                    disk.to_string(),
                    epoch.to_string(),
                ]);
            }
        }
        println!("{v}");
        if cg.replicas.is_empty() {
            println!(
                "no replicas (add one with `convoy cg replicate {} --to HOST --mode MODE`)",
                cg.name
            );
            return Ok(());
        }
        let mut t = table(&[
            "COPY",
            "MODE",
            "STATE",
            "PHASE",
            "ACKED",
            "LAG (writes)",
            "LAG (s)",
            "SENT",
            "ERROR",
        ]);
        for r in &cg.replicas {
            t.add_row(vec![
                format!("node {}", r.host),
                r.mode.clone(),
                r.state.clone(),
                opt(r.phase.as_ref()),
                opt(r.acked_seq),
                opt(r.lag_writes),
                r.lag_seconds.map_or("-".into(), |s| format!("{s:.1}")),
                r.bytes_sent.map_or("-".into(), format_size),
                opt(r.last_error.as_ref()),
            ]);
        }
        println!("{t}");
        Ok(())
    }

    /// `disk list`.
    pub fn disks(&self, disks: &[DiskInfo]) -> Result<()> {
        if self.format == Format::Json {
            return self.json(disks);
        }
        let mut t = table(&["DISK", "VM", "INDEX", "SIZE", "EPOCH", "HOST", "REPLICAS"]);
        for d in disks {
            let replicas = d
                .replicas
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(",");
            t.add_row(vec![
                d.id.to_string(),
                d.vm.clone(),
                d.index.to_string(),
                format_size(d.size),
                d.epoch.to_string(),
                d.host.to_string(),
                if replicas.is_empty() {
                    "-".into()
                } else {
                    replicas
                },
            ]);
        }
        println!("{t}");
        Ok(())
    }

    /// `vm verify` / `cg verify`: prints the report; fails (non-zero exit) unless it is ok.
    pub fn verified(&self, v: &VerifyResponse) -> Result<()> {
        if self.format == Format::Json {
            self.json(v)?;
        } else {
            println!(
                "copy on node {}: {}",
                v.host,
                if v.ok { "OK" } else { "FAILED" }
            );
            println!("{}", v.text);
        }
        if !v.ok {
            anyhow::bail!("verification failed on node {}", v.host);
        }
        Ok(())
    }

    /// `cg sync`.
    /// `vm move`.
    pub fn moved(&self, m: &MoveVmResponse) -> Result<()> {
        if self.format == Format::Json {
            return self.json(m);
        }
        println!(
            "VM {} moved from node {} to node {}{}",
            m.vm.name,
            m.from,
            m.to,
            match (&m.live_migration, m.guest_moved) {
                (Some(q), _) => format!(
                    " by live migration: QEMU moved {} of guest memory in {} ms, the guest paused {} ms",
                    crate::units::format_size(q.ram_bytes),
                    q.total_ms,
                    q.downtime_ms
                ),
                (None, true) => format!("; its guest was paused {:.1} ms", m.stun_ms),
                (None, false) => String::new(),
            }
        );
        if !m.fenced {
            println!(
                "warning: the primary did not confirm the old epoch is fenced (is it down?); it refuses old writers once it runs again"
            );
        }
        self.vm(&m.vm)
    }

    /// `cg switch-primary`.
    pub fn switched(&self, r: &SwitchPrimaryResponse) -> Result<()> {
        if self.format == Format::Json {
            return self.json(r);
        }
        println!(
            "node {} is the primary of '{}' from sequence {}; node {} is its replica (writes paused {:.1} ms)",
            r.cg.sequencer,
            r.cg.name,
            r.last_seq + 1,
            r.from,
            r.paused_ms
        );
        self.cg(&r.cg)
    }

    /// `cg sync`.
    pub fn synced(&self, r: &crate::data::SyncReport) -> Result<()> {
        if self.format == Format::Json {
            return self.json(r);
        }
        let mut t = table(&[
            "DISK",
            "SIZE",
            "HASHES COMPARED",
            "HASH BYTES",
            "CHUNKS SENT",
            "DATA SENT",
            "ON THE WIRE",
            "TIME",
        ]);
        for d in &r.disks {
            t.add_row(vec![
                d.disk.to_string(),
                format_size(d.size),
                d.hash_nodes_compared.to_string(),
                format_size(d.hash_bytes),
                format!("{} of {}", d.chunks_sent, d.chunks_total),
                format_size(d.data_bytes_sent),
                format_size(d.wire_bytes),
                format!("{:.2}s", d.seconds),
            ]);
        }
        println!(
            "{}",
            if r.compare {
                "compare-delta"
            } else {
                "full copy"
            }
        );
        println!("{t}");
        Ok(())
    }

    /// `cg snapshot ...`.
    pub fn snapshots(&self, snaps: &[SnapshotView]) -> Result<()> {
        if self.format == Format::Json {
            return self.json(snaps);
        }
        if snaps.is_empty() {
            println!("no snapshots");
            return Ok(());
        }
        let mut t = table(&[
            "GROUP",
            "SNAPSHOT",
            "HOST",
            "CREATED",
            "LAST SEQ",
            "RESTORED CHUNKS",
        ]);
        for s in snaps {
            t.add_row(vec![
                s.cg.clone(),
                s.name.clone(),
                s.host.to_string(),
                crate::units::format_utc_ms(s.created_at_ms),
                opt(s.last_seq),
                opt(s.chunks_restored),
            ]);
        }
        println!("{t}");
        Ok(())
    }

    /// `disk expose`.
    pub fn exposed(&self, e: &ExposeResponse) -> Result<()> {
        if self.format == Format::Json {
            return self.json(e);
        }
        println!("disk {} on node {}, read-only:", e.disk, e.host);
        for u in &e.uris {
            println!("  {u}");
        }
        Ok(())
    }
}

fn replicas(cg: &CgView) -> String {
    if cg.replicas.is_empty() {
        return "-".into();
    }
    cg.replicas
        .iter()
        .map(|r| format!("node {} ({})", r.host, r.mode))
        .collect::<Vec<_>>()
        .join(", ")
}

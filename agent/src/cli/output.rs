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

fn table(header: &[&str]) -> Table {
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
            "VM {} (id {}) on node {}   cg: {}   {}",
            vm.name,
            vm.id,
            vm.host,
            opt(vm.cg.as_ref()),
            if vm.running { "running" } else { "stopped" }
        );
        if let Some(w) = &vm.workload {
            println!("workload: {w}");
        }
        let mut t = table(&["DISK", "ID", "SIZE", "EPOCH"]);
        for d in &vm.disks {
            t.add_row(vec![
                d.index.to_string(),
                d.id.to_string(),
                format_size(d.size),
                d.epoch.to_string(),
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
        println!("consistency group {} (id {})", cg.name, cg.id);
        let mut t = table(&["FIELD", "VALUE"]);
        t.add_row(vec!["vms".to_string(), cg.vms.join(", ")]);
        t.add_row(vec!["primary".to_string(), cg.primary.to_string()]);
        t.add_row(vec!["sequencer".to_string(), cg.sequencer.to_string()]);
        t.add_row(vec!["replicas".to_string(), replicas(cg)]);
        println!("{t}");
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

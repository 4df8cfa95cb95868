//! Workload specs such as `iops=200,size=4k,pattern=random`.
//!
//! Pure parsing and formatting: `Workload::from_str(&w.to_string()) == Ok(w)` for every
//! valid workload, so the canonical string can be stored in the cluster model and shown
//! to operators.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use crate::content::SECTOR_SIZE;
use crate::error::GuestError;

/// Largest write the guest issues; the NBD protocol's payload limit.
pub const MAX_WRITE_SIZE: u32 = 32 << 20;
/// Most writes the guest keeps in flight.
pub const MAX_DEPTH: u32 = 1024;
/// Highest finite rate accepted by `iops=`.
pub const MAX_IOPS: u32 = 1_000_000;

const KEYS: &str = "iops, size, pattern, depth, span, flush_every, seed, fill";

/// Where the guest's writes land within the written region of each disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Uniformly random blocks.
    Random,
    /// Consecutive blocks, wrapping at the end of the region, disks taken in turn.
    Sequential,
    /// 90% of writes go to the first 10% of the region's blocks, the rest to the others.
    Hot,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Random => "random",
            Pattern::Sequential => "sequential",
            Pattern::Hot => "hot",
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A synthetic guest workload.
///
/// Construct it by parsing ([`FromStr`]) or from [`Workload::default`]; a hand-built value
/// is checked by [`Workload::validate`] when the guest starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Target writes issued per second, acknowledged or not (token bucket); `None`
    /// (`iops=max`) issues as fast as `depth` allows.
    pub iops: Option<u32>,
    /// Bytes per write: a multiple of 512, at most [`MAX_WRITE_SIZE`]. Writes are aligned
    /// to their size.
    pub size: u32,
    /// Placement of writes.
    pub pattern: Pattern,
    /// Writes in flight at most (1..=[`MAX_DEPTH`]).
    pub depth: u32,
    /// Bytes written at the start of each disk; `None` = the whole disk. Clamped to the
    /// disk size and rounded down to a multiple of `size`.
    pub span: Option<u64>,
    /// Issue a flush of every disk after this many acknowledged writes; 0 = never.
    pub flush_every: u32,
    /// Seed for the placement of writes; `None` = random at start.
    pub seed: Option<u64>,
    /// Bytes per write of a first pass that writes the whole span of every disk once, in
    /// order and as fast as `depth` allows, before the steady workload starts (a guest
    /// installing its system): disks then hold data everywhere, as real ones do. The pass
    /// runs only for a fresh log (see [`crate::Guest::start`]). A multiple of 512, at most
    /// [`MAX_WRITE_SIZE`]; `None` = no pass.
    pub fill: Option<u32>,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            iops: Some(100),
            size: 4096,
            pattern: Pattern::Random,
            depth: 1,
            span: None,
            flush_every: 0,
            seed: None,
            fill: None,
        }
    }
}

fn err(key: &str, reason: impl Into<String>) -> GuestError {
    GuestError::Workload {
        key: key.to_string(),
        reason: reason.into(),
    }
}

impl Workload {
    /// Checks the invariants documented on the fields.
    pub fn validate(&self) -> Result<(), GuestError> {
        if let Some(iops) = self.iops
            && !(1..=MAX_IOPS).contains(&iops)
        {
            return Err(err(
                "iops",
                format!("{iops} is out of range; use 1..={MAX_IOPS} or 'max'"),
            ));
        }
        if self.size == 0 || self.size % SECTOR_SIZE as u32 != 0 || self.size > MAX_WRITE_SIZE {
            return Err(err(
                "size",
                format!(
                    "{} is not allowed; use a multiple of 512 bytes up to {} (e.g. 4k, 64KiB)",
                    format_size(u64::from(self.size)),
                    format_size(u64::from(MAX_WRITE_SIZE))
                ),
            ));
        }
        if !(1..=MAX_DEPTH).contains(&self.depth) {
            return Err(err(
                "depth",
                format!("{} is out of range; use 1..={MAX_DEPTH}", self.depth),
            ));
        }
        if let Some(fill) = self.fill
            && (fill == 0 || fill % SECTOR_SIZE as u32 != 0 || fill > MAX_WRITE_SIZE)
        {
            return Err(err(
                "fill",
                format!(
                    "{} is not allowed; use a multiple of 512 bytes up to {} (e.g. 1m)",
                    format_size(u64::from(fill)),
                    format_size(u64::from(MAX_WRITE_SIZE))
                ),
            ));
        }
        if let Some(span) = self.span
            && span < u64::from(self.size)
        {
            return Err(err(
                "span",
                format!(
                    "{} is smaller than one write (size={}); use at least the write size",
                    format_size(span),
                    format_size(u64::from(self.size))
                ),
            ));
        }
        Ok(())
    }

    /// [`Workload::validate`], and that every disk of `disk_sizes` holds at least one
    /// write in the region the guest writes: what [`crate::Guest::start`] needs of a VM's
    /// disks, so a workload can be refused when the VM is created instead of failing on
    /// its host later.
    pub fn validate_for_disks(&self, disk_sizes: &[u64]) -> Result<(), GuestError> {
        self.validate()?;
        let size = u64::from(self.size);
        for (i, &disk) in disk_sizes.iter().enumerate() {
            let region = self.span.map_or(disk, |s| s.min(disk));
            if region < size {
                return Err(err(
                    "size",
                    format!(
                        "{} is larger than disk {i} ({}); use a write size up to the smallest disk",
                        format_size(size),
                        format_size(disk)
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn parse_u64(key: &str, value: &str, what: &str) -> Result<u64, GuestError> {
    value
        .parse::<u64>()
        .map_err(|_| err(key, format!("'{value}' is not {what}")))
}

fn parse_u32(key: &str, value: &str, what: &str) -> Result<u32, GuestError> {
    value
        .parse::<u32>()
        .map_err(|_| err(key, format!("'{value}' is not {what}")))
}

impl FromStr for Workload {
    type Err = GuestError;

    /// Parses `key=value` items separated by commas. Keys: `iops` (1..=1000000 or `max`),
    /// `size`, `pattern` (`random`, `sequential`, `hot`), `depth`, `span`, `flush_every`,
    /// `seed`, `fill`. Omitted keys keep their [`Default`]. Sizes take `k`/`KiB`, `m`/`MiB`,
    /// `g`/`GiB`, `t`/`TiB` (binary) or plain bytes.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut w = Workload::default();
        let mut seen = BTreeSet::new();
        for item in spec.split(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let Some((key, value)) = item.split_once('=') else {
                return Err(err(
                    "spec",
                    format!("'{item}' is not key=value; keys are {KEYS}"),
                ));
            };
            let key = key.trim().to_ascii_lowercase();
            let value = value.trim();
            if !seen.insert(key.clone()) {
                return Err(err(&key, "given more than once"));
            }
            match key.as_str() {
                "iops" => {
                    w.iops = match value.to_ascii_lowercase().as_str() {
                        "max" | "unlimited" => None,
                        _ => Some(parse_u32(
                            &key,
                            value,
                            "a rate; use 1..=1000000 writes per second or 'max'",
                        )?),
                    }
                }
                "size" => {
                    let bytes = parse_size(value).map_err(|e| err(&key, e))?;
                    w.size = u32::try_from(bytes).map_err(|_| {
                        err(
                            &key,
                            format!("'{value}' is larger than {MAX_WRITE_SIZE} bytes"),
                        )
                    })?;
                }
                "pattern" => {
                    w.pattern = match value.to_ascii_lowercase().as_str() {
                        "random" => Pattern::Random,
                        "sequential" | "seq" => Pattern::Sequential,
                        "hot" => Pattern::Hot,
                        _ => {
                            return Err(err(
                                &key,
                                format!("'{value}' is not one of random, sequential, hot"),
                            ));
                        }
                    }
                }
                "depth" => {
                    w.depth = parse_u32(&key, value, "a number of writes in flight (1..=1024)")?
                }
                "span" => w.span = Some(parse_size(value).map_err(|e| err(&key, e))?),
                "flush_every" => {
                    w.flush_every = parse_u32(&key, value, "a number of writes (0 = never flush)")?
                }
                "seed" => w.seed = Some(parse_u64(&key, value, "an unsigned 64-bit number")?),
                "fill" => {
                    let bytes = parse_size(value).map_err(|e| err(&key, e))?;
                    w.fill = Some(u32::try_from(bytes).map_err(|_| {
                        err(
                            &key,
                            format!("'{value}' is larger than {MAX_WRITE_SIZE} bytes"),
                        )
                    })?);
                }
                _ => {
                    return Err(err(&key, format!("unknown key; allowed keys: {KEYS}")));
                }
            }
        }
        w.validate()?;
        Ok(w)
    }
}

impl fmt::Display for Workload {
    /// The canonical spec: every key with a meaning, in a fixed order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.iops {
            Some(iops) => write!(f, "iops={iops}")?,
            None => f.write_str("iops=max")?,
        }
        write!(
            f,
            ",size={},pattern={},depth={}",
            format_size(u64::from(self.size)),
            self.pattern,
            self.depth
        )?;
        if let Some(span) = self.span {
            write!(f, ",span={}", format_size(span))?;
        }
        if self.flush_every > 0 {
            write!(f, ",flush_every={}", self.flush_every)?;
        }
        if let Some(seed) = self.seed {
            write!(f, ",seed={seed}")?;
        }
        if let Some(fill) = self.fill {
            write!(f, ",fill={}", format_size(u64::from(fill)))?;
        }
        Ok(())
    }
}

/// Parses a whole number of bytes with an optional binary unit: `4096`, `4k`, `64KiB`,
/// `1m`, `2GiB`, `1T` (case-insensitive; `KB` also means 1024). The error says which forms
/// are accepted.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let hint =
        "use a whole number with an optional unit k/KiB, m/MiB, g/GiB, t/TiB (e.g. 4k, 64MiB)";
    if num.is_empty() {
        return Err(format!("'{text}' is not a size; {hint}"));
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("'{text}' has an unknown unit '{unit}'; {hint}")),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// Formats bytes exactly, with the largest binary unit that divides them (`4KiB`,
/// `64MiB`), else as plain bytes (`1536`); [`parse_size`] reads it back unchanged.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (name, shift) in UNITS {
        let unit = 1u64 << shift;
        if bytes >= unit && bytes % unit == 0 {
            return format!("{}{name}", bytes / unit);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_issue_example() {
        let w: Workload = "iops=200,size=4k,pattern=random".parse().unwrap();
        assert_eq!(w.iops, Some(200));
        assert_eq!(w.size, 4096);
        assert_eq!(w.pattern, Pattern::Random);
        assert_eq!(w.depth, 1);
        assert_eq!(w.span, None);
        assert_eq!(w.to_string(), "iops=200,size=4KiB,pattern=random,depth=1");
    }

    #[test]
    fn parses_every_key() {
        let w: Workload =
            " IOPS=max , size=64KiB,pattern=hot,depth=8,span=64MiB,flush_every=10,seed=42,fill=1m "
                .parse()
                .unwrap();
        assert_eq!(
            w,
            Workload {
                iops: None,
                size: 64 << 10,
                pattern: Pattern::Hot,
                depth: 8,
                span: Some(64 << 20),
                flush_every: 10,
                seed: Some(42),
                fill: Some(1 << 20),
            }
        );
        assert_eq!(
            w.to_string(),
            "iops=max,size=64KiB,pattern=hot,depth=8,span=64MiB,flush_every=10,seed=42,fill=1MiB"
        );
    }

    #[test]
    fn empty_spec_is_the_default() {
        assert_eq!("".parse::<Workload>().unwrap(), Workload::default());
    }

    #[test]
    fn display_round_trips() {
        let specs = [
            "iops=1,size=512,pattern=sequential",
            "iops=1000000,size=32MiB,depth=1024,span=33MiB",
            "size=1536,span=3072,seed=18446744073709551615",
            "iops=max,pattern=seq,flush_every=1",
            "iops=200,fill=1m",
        ];
        for spec in specs {
            let w: Workload = spec.parse().unwrap();
            let again: Workload = w.to_string().parse().unwrap();
            assert_eq!(again, w, "{spec} -> {w}");
        }
    }

    #[test]
    fn errors_name_the_key_and_the_allowed_values() {
        let cases = [
            ("iops=0", "iops", "1..=1000000"),
            ("iops=fast", "iops", "'max'"),
            ("size=1000", "size", "multiple of 512"),
            ("size=64MiB", "size", "multiple of 512"),
            ("size=4q", "size", "unknown unit"),
            ("pattern=zigzag", "pattern", "random, sequential, hot"),
            ("depth=0", "depth", "1..=1024"),
            ("depth=5000", "depth", "1..=1024"),
            ("size=8k,span=4k", "span", "smaller than one write"),
            ("flush_every=-1", "flush_every", "0 = never"),
            ("fill=1000", "fill", "multiple of 512"),
            ("fill=0", "fill", "multiple of 512"),
            ("fill=64MiB", "fill", "multiple of 512"),
            ("color=blue", "color", "allowed keys"),
            ("iops", "spec", "key=value"),
            ("iops=1,iops=2", "iops", "more than once"),
        ];
        for (spec, key, hint) in cases {
            match spec.parse::<Workload>() {
                Err(GuestError::Workload { key: k, reason }) => {
                    assert_eq!(k, key, "{spec}");
                    assert!(reason.contains(hint), "{spec}: {reason}");
                }
                other => panic!("{spec}: expected a workload error, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_write_larger_than_a_disk_is_refused_for_that_disk() {
        let w: Workload = "size=4m".parse().unwrap();
        assert!(w.validate_for_disks(&[8 << 20, 4 << 20]).is_ok());
        match w.validate_for_disks(&[8 << 20, 1 << 20]) {
            Err(GuestError::Workload { key, reason }) => {
                assert_eq!(key, "size");
                assert!(reason.contains("disk 1 (1MiB)"), "{reason}");
            }
            other => panic!("expected a size error, got {other:?}"),
        }
        // The span limits the region on every disk, the disk limits the span.
        let w: Workload = "size=64k,span=1m".parse().unwrap();
        assert!(w.validate_for_disks(&[32 << 10]).is_err());
        assert!(w.validate_for_disks(&[64 << 10]).is_ok());
    }

    #[test]
    fn sizes_parse_and_format() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2gib").unwrap(), 2 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("1.5k").is_err());
        assert!(parse_size("99999999999T").is_err());
        for v in [512, 1536, 4096, 1 << 20, 3 << 30, 5 << 40] {
            assert_eq!(parse_size(&format_size(v)).unwrap(), v);
        }
    }
}

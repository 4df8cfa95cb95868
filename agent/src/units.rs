//! Human sizes: `64MiB`, `4GiB`, `512KiB`, `1T`, plain bytes.

/// Parses a size such as `64MiB`, `4GiB`, `1.5GiB`, `4096` or `10G` (binary multiples:
/// K/KiB = 1024). Errors say what forms are accepted.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let hint = "use a number with an optional unit: B, KiB, MiB, GiB, TiB (e.g. 64MiB, 4GiB)";
    if num.is_empty() {
        return Err(format!("invalid size '{text}': {hint}"));
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "invalid size '{text}': unknown unit '{unit}'; {hint}"
            ));
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid size '{text}': {hint}"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("invalid size '{text}': too large"));
    }
    if bytes.fract() != 0.0 {
        return Err(format!(
            "invalid size '{text}': not a whole number of bytes"
        ));
    }
    Ok(bytes as u64)
}

/// Formats bytes with the largest binary unit that keeps the value exact when possible.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (name, shift) in UNITS {
        let unit = 1u64 << shift;
        if bytes >= unit {
            return if bytes % unit == 0 {
                format!("{}{name}", bytes / unit)
            } else {
                format!("{:.1}{name}", bytes as f64 / unit as f64)
            };
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size(" 2 kib ").unwrap(), 2048);
    }

    #[test]
    fn rejects_nonsense_with_a_hint() {
        for bad in ["", "MiB", "12XB", "-1GiB", "1.0000001B", "99999999999TiB"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("invalid size"), "{bad}: {e}");
        }
    }

    #[test]
    fn formats_exact_units() {
        assert_eq!(format_size(64 << 20), "64MiB");
        assert_eq!(format_size(3 << 29), "1.5GiB");
        assert_eq!(format_size(100), "100B");
    }
}

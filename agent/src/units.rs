//! Human sizes and times.
//!
//! Sizes follow qemu-img's convention: a number with an optional unit, where K, M, G and T
//! are binary (1K = 1024); `KiB`, `MiB`, `GiB`, `TiB` (and `KB`, ... read the same way)
//! are accepted too, and a plain number is bytes. They are printed back in binary units
//! with a space (`10 GiB`, `1.5 GiB`, `1 byte`), so an operator sees what was understood.

/// Parses a size such as `64MiB`, `4GiB`, `1.5GiB`, `4096` or `10G` (binary multiples:
/// K/KiB = 1024, as qemu-img reads them). Errors say what forms are accepted.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let hint = "use a number with an optional unit K, M, G or T, binary as in qemu-img (1K = 1024; KiB, MiB, GiB, TiB too), e.g. 64M or 4GiB";
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

/// Formats bytes with the largest binary unit, exact when it can be (`64 MiB`, `1.5 GiB`,
/// `1 byte`, `512 bytes`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (name, shift) in UNITS {
        let unit = 1u64 << shift;
        if bytes >= unit {
            return if bytes % unit == 0 {
                format!("{} {name}", bytes / unit)
            } else {
                format!("{:.1} {name}", bytes as f64 / unit as f64)
            };
        }
    }
    if bytes == 1 {
        "1 byte".to_string()
    } else {
        format!("{bytes} bytes")
    }
}

/// Formats milliseconds since the Unix epoch as a UTC time, `2026-12-07 01:23:45 UTC`.
pub fn format_utc_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
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
    fn formats_exact_units_with_a_space_and_one_byte_singular() {
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(100), "100 bytes");
        assert_eq!(format_size(1), "1 byte");
        assert_eq!(format_size(0), "0 bytes");
    }

    /// qemu-img's convention: K, M, G, T are binary, the IEC spellings mean the same, and
    /// what is parsed prints back as the operator meant it.
    #[test]
    fn single_letter_units_are_binary_as_in_qemu_img_and_echo_back() {
        for (text, bytes, shown) in [
            ("10G", 10u64 << 30, "10 GiB"),
            ("10GiB", 10 << 30, "10 GiB"),
            ("512K", 512 << 10, "512 KiB"),
            ("1T", 1 << 40, "1 TiB"),
            ("1.5M", 3 << 19, "1.5 MiB"),
            ("1", 1, "1 byte"),
        ] {
            assert_eq!(parse_size(text).unwrap(), bytes, "{text}");
            assert_eq!(format_size(bytes), shown, "{text}");
        }
        let e = parse_size("10X").unwrap_err();
        assert!(e.contains("binary as in qemu-img"), "{e}");
    }

    #[test]
    fn formats_utc_times() {
        assert_eq!(format_utc_ms(0), "1970-01-01 00:00:00 UTC");
        // 2026-12-07 01:23:45.678 UTC
        assert_eq!(format_utc_ms(1_796_606_625_678), "2026-12-07 01:23:45 UTC");
        // A leap day.
        assert_eq!(format_utc_ms(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}

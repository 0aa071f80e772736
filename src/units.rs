//! Byte sizes as people write them (`24G`, `24GiB`, `512M`, `1.5G`) and as we print them.
//!
//! Like llama.cpp and the GPU vendors' tools, a bare `G` means GiB (1024^3): `--gpu-mem 24G`
//! is a 24 GiB card. `GB` means 10^9, for those who want decimal units.

/// Why a text is not a byte size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error(
        "cannot read {0:?} as a size: write a number and a unit, e.g. 24G, 24GiB, 512M or 1.5GB"
    )]
    Unreadable(String),
    #[error("size {0:?} is below one byte: give a size of at least 1 byte, e.g. 512M")]
    TooSmall(String),
    #[error("size {0:?} is too large: sizes go up to 8 EiB, e.g. 24G")]
    TooLarge(String),
}

/// A number for a message: as written when ordinary (`0.5`, `25`), in exponent notation when
/// tiny or huge (`1e-300`, not three hundred digits).
pub fn format_number<T>(v: T) -> String
where
    T: Copy + Into<f64> + std::fmt::Display + std::fmt::LowerExp,
{
    let x: f64 = v.into();
    if x == 0.0 || !x.is_finite() || (1e-4..1e9).contains(&x.abs()) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

/// Parses a byte size: a number (fractions allowed) and an optional unit among
/// B, K, KB, KiB, M, MB, MiB, G, GB, GiB, T, TB, TiB (case-insensitive).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || SizeError::Unreadable(text.to_string());
    let value: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024f64.powi(2),
        "mb" => 1e6,
        "g" | "gib" => 1024f64.powi(3),
        "gb" => 1e9,
        "t" | "tib" => 1024f64.powi(4),
        "tb" => 1e12,
        _ => return Err(bad()),
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes > u64::MAX as f64 / 2.0 {
        return Err(SizeError::TooLarge(text.to_string()));
    }
    if bytes < 1.0 {
        return Err(SizeError::TooSmall(text.to_string()));
    }
    Ok(bytes.round() as u64)
}

/// `bytes` in binary units with three significant digits: `24.0 GiB`, `512 MiB`, `900 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ if v >= 100.0 => format!("{v:.0} {}", UNITS[unit]),
        _ if v >= 10.0 => format!("{v:.1} {}", UNITS[unit]),
        _ => format!("{v:.2} {}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!(parse_size("24G").unwrap(), 24 << 30);
        assert_eq!(parse_size("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_size("24gib").unwrap(), 24 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("24GB").unwrap(), 24_000_000_000);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size(" 64 KiB ").unwrap(), 64 << 10);
    }

    #[test]
    fn refuses_what_is_not_a_size() {
        for bad in ["", "G", "24X", "-1G", "0", "1..2G", "abc", "0.1"] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn out_of_range_sizes_say_which_end() {
        let too_large = parse_size("99999999999999999999999").unwrap_err();
        assert!(matches!(too_large, SizeError::TooLarge(_)), "{too_large}");
        assert!(too_large.to_string().contains("too large"), "{too_large}");
        let too_small = parse_size("0.1").unwrap_err();
        assert!(matches!(too_small, SizeError::TooSmall(_)), "{too_small}");
    }

    #[test]
    fn numbers_are_short_at_any_magnitude() {
        assert_eq!(format_number(1e-300), "1e-300");
        assert_eq!(format_number(2.5e40), "2.5e40");
        assert_eq!(format_number(0.5), "0.5");
        assert_eq!(format_number(25.0), "25");
        assert_eq!(format_number(f64::NAN), "NaN");
        assert_eq!(format_number(1e-38f32), "1e-38");
        assert_eq!(format_number(0.95f32), "0.95");
    }

    #[test]
    fn formats_in_binary_units() {
        assert_eq!(format_bytes(900), "900 B");
        assert_eq!(format_bytes(24 << 30), "24.0 GiB");
        assert_eq!(format_bytes(512 << 20), "512 MiB");
        assert_eq!(format_bytes(3 << 29), "1.50 GiB");
    }
}

//! Parsers of the units every flag shares: durations (humantime) and sizes
//! in binary units. A leaf: each concern's flags (`*Args`) use these
//! without reaching up to the command line that composes them.

use std::time::Duration;

/// A size in bytes: `65536`, `512KiB`, `64MiB`, `1GiB` (binary units; `B`
/// allowed). Shared by every size flag.
pub fn parse_bytes(value: &str) -> Result<u64, String> {
    let digits = value.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &value[digits.len()..];
    let scale: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(format!("unknown unit {unit:?} (use B, KiB, MiB or GiB)")),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| "expected a number of bytes such as 64KiB".to_owned())?;
    let bytes = n.checked_mul(scale).ok_or_else(|| "too large".to_owned())?;
    if bytes == 0 {
        return Err("must be greater than zero".into());
    }
    Ok(bytes)
}

/// [`parse_bytes`] for a size held in memory.
pub fn parse_size(value: &str) -> Result<usize, String> {
    usize::try_from(parse_bytes(value)?).map_err(|_| "too large".to_owned())
}

/// A positive humantime duration (`500ms`, `10s`, `24h`). Shared by every
/// duration flag that must not be zero.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(value).map_err(|e| format!("{e} (examples: 500ms, 10s, 1m)"))?;
    if duration.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(duration)
}

/// A duration as the messages show it: humantime, to the millisecond
/// (`1s 500ms`, never `1s 500ms 12us 7ns`).
pub fn format_millis(duration: Duration) -> String {
    humantime::format_duration(Duration::from_millis(duration.as_millis() as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_shown_to_the_millisecond() {
        assert_eq!(format_millis(Duration::from_micros(1_500_012)), "1s 500ms");
        assert_eq!(format_millis(Duration::from_micros(900)), "0s");
    }

    #[test]
    fn sizes_take_binary_units_and_zero_is_refused() {
        assert_eq!(parse_bytes("65536"), Ok(65_536));
        assert_eq!(parse_bytes("64KiB"), Ok(65_536));
        assert_eq!(parse_bytes("1MiB"), Ok(1_048_576));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("64KB").is_err(), "ambiguous units are refused");
    }

    #[test]
    fn durations_must_be_positive() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(
            parse_duration("0s")
                .unwrap_err()
                .contains("greater than zero")
        );
        assert!(parse_duration("soon").is_err());
    }
}

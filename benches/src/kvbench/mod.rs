//! `kvbench`: a fio-like storage harness over csd-engine's own I/O layer, and a KV-store
//! workload. See `kvbench --help`.

pub mod kv;
pub mod raw;

use anyhow::{bail, Context, Result};

/// Parse a fio-style size: plain bytes, or a k/m/g/t suffix (powers of 1024, as fio does;
/// an optional "i"/"b"/"ib" is accepted).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches('b').trim_end_matches('i');
    let (num, mul) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    if n.is_nan() || n < 0.0 {
        bail!("bad size {s:?}");
    }
    Ok((n * mul as f64) as u64)
}

/// Parse a fio-style time: seconds, or with an s/m/h/ms/us suffix. Returns seconds.
pub fn parse_time(s: &str) -> Result<f64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mul) = if let Some(x) = t.strip_suffix("ms") {
        (x, 1e-3)
    } else if let Some(x) = t.strip_suffix("us") {
        (x, 1e-6)
    } else if let Some(x) = t.strip_suffix('s') {
        (x, 1.0)
    } else if let Some(x) = t.strip_suffix('m') {
        (x, 60.0)
    } else if let Some(x) = t.strip_suffix('h') {
        (x, 3600.0)
    } else {
        (t.as_str(), 1.0)
    };
    let n: f64 = num.parse().with_context(|| format!("bad time {s:?}"))?;
    Ok(n * mul)
}

/// Human-readable bytes per second in fio's style: "841MiB/s (882MB/s)".
pub fn fmt_bw(bytes_per_s: f64) -> String {
    let (bin, bu) = scale(bytes_per_s, 1024.0, &["B", "KiB", "MiB", "GiB", "TiB"]);
    let (dec, du) = scale(bytes_per_s, 1000.0, &["B", "kB", "MB", "GB", "TB"]);
    format!("{bin:.0}{bu}/s ({dec:.0}{du}/s)")
}

fn scale(mut v: f64, base: f64, units: &[&'static str]) -> (f64, &'static str) {
    let mut i = 0;
    while v >= base * 10.0 && i + 1 < units.len() {
        v /= base;
        i += 1;
    }
    (v, units[i])
}

/// A count in fio's style: plain, or with a k/M suffix from ten thousand on.
pub fn fmt_count(v: f64) -> String {
    if v >= 10_000_000.0 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 10_000.0 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("128KiB").unwrap(), 128 << 10);
        assert_eq!(parse_size("1m").unwrap(), 1 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("x").is_err());
        assert_eq!(parse_time("10").unwrap(), 10.0);
        assert_eq!(parse_time("500ms").unwrap(), 0.5);
        assert_eq!(parse_time("2m").unwrap(), 120.0);
    }
}

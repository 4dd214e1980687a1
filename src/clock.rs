//! Wall-clock helpers: unix time in ms/µs and RFC 3339 text.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in microseconds.
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    (now_us() / 1000) as i64
}

/// RFC 3339 UTC text with milliseconds, e.g. `2026-11-24T10:00:00.123Z`. Written field by
/// field: every final result carries two, and a format string is parsed at each call.
pub fn rfc3339_ms(ms: i64) -> String {
    use chrono::{Datelike, Timelike};
    use std::fmt::Write;
    let Some(t) = chrono::DateTime::from_timestamp_millis(ms) else {
        return String::new();
    };
    let mut s = String::with_capacity(24);
    let _ = write!(
        s,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        ms.rem_euclid(1000)
    );
    s
}

/// The UTC date `YYYY-MM-DD` of a unix time in ms (dead-letter folders).
pub(crate) fn date_utc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "1970-01-01".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_text_matches_the_format_string() {
        let mut ms: i64 = -86_400_000 * 400;
        while ms < 253_402_300_799_000 {
            let want = chrono::DateTime::from_timestamp_millis(ms)
                .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
                .unwrap_or_default();
            assert_eq!(rfc3339_ms(ms), want, "at {ms} ms");
            ms += 7_919_777_777;
        }
        assert_eq!(rfc3339_ms(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }
}

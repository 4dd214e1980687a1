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

/// RFC 3339 UTC text with milliseconds, e.g. `2026-11-24T10:00:00.123Z`.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

/// The UTC date `YYYY-MM-DD` of a unix time in ms (dead-letter folders).
pub(crate) fn date_utc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "1970-01-01".to_string())
}

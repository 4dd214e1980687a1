//! The cron file: parsing and checking its lines, and their fire times in a time zone.
//!
//! A line is seven time fields (sec min hour day-of-month month day-of-week year, as the `cron`
//! crate reads them), then the task's name, its method, and the rest of the line as params.

use crate::task::{parse_task, Limits, Method};
use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use cron::Schedule;
use serde_json::{json, Value};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// Number of time fields in a line.
const TIME_FIELDS: usize = 7;

/// One scheduled line.
#[derive(Clone, Debug)]
pub(crate) struct CronLine {
    /// 1-based line number in the file.
    pub(crate) line: usize,
    /// Stable for an unchanged line: part of every firing's task id.
    pub(crate) key: String,
    /// The seven time fields as written (single spaces).
    pub(crate) expr: String,
    pub(crate) schedule: Schedule,
    pub(crate) name: String,
    pub(crate) method: Method,
    pub(crate) params: String,
}

/// A bad line (or an unreadable file): `FILE:LINE: reason`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CronError {
    pub(crate) file: String,
    pub(crate) line: usize,
    pub(crate) reason: String,
}

impl fmt::Display for CronError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.reason)
    }
}

impl std::error::Error for CronError {}

/// FNV-1a, 64 bits: a stable key for a line's text (not for security).
fn stable_key(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

impl CronLine {
    /// The task JSON of the firing at unix second `at`.
    pub(crate) fn task_json(&self, at: i64) -> Value {
        json!({
            "id": self.firing_id(at),
            "method": self.method.as_str(),
            "name": self.name,
            "params": self.params,
        })
    }

    /// `cron-<line key>-<unix time>`: the same firing always has the same id.
    pub(crate) fn firing_id(&self, at: i64) -> String {
        format!("cron-{}-{at}", self.key)
    }

    /// The first fire time strictly after unix second `after`, in zone `tz`.
    pub(crate) fn next_after(&self, after: i64, tz: Tz) -> Option<i64> {
        let from = tz.timestamp_opt(after, 0).single()?;
        self.schedule.after(&from).next().map(|t| t.timestamp())
    }

    /// The next `n` fire times after `after`.
    pub(crate) fn upcoming(&self, after: DateTime<Utc>, tz: Tz, n: usize) -> Vec<DateTime<Tz>> {
        self.schedule
            .after(&after.with_timezone(&tz))
            .take(n)
            .collect()
    }

    /// The last fire time in `(after, until]`, scanning at most `limit` fire times.
    pub(crate) fn last_between(&self, after: i64, until: i64, tz: Tz, limit: usize) -> Option<i64> {
        let from = tz.timestamp_opt(after, 0).single()?;
        let mut last = None;
        for t in self.schedule.after(&from).take(limit) {
            let ts = t.timestamp();
            if ts > until {
                break;
            }
            last = Some(ts);
        }
        last
    }
}

/// Each time field's name and its allowed values, in line order (as the `cron` crate numbers
/// them: day of week 1–7 is Sunday–Saturday).
const FIELD_RANGES: [(&str, u32, u32); TIME_FIELDS] = [
    ("seconds", 0, 59),
    ("minutes", 0, 59),
    ("hours", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 1, 7),
    ("year", 1970, 2100),
];

/// Checks every number written as a value in the time fields (in lists, ranges and before a
/// `/step`) against the field's range, so the error states the range that is true.
/// Names (`Mon`, `Jan`), `*`, `?` and steps are left to the `cron` crate.
fn check_ranges(fields: &[&str]) -> Result<(), String> {
    for (field, (what, min, max)) in fields.iter().zip(FIELD_RANGES) {
        for item in field.split(',') {
            let values = item.split_once('/').map_or(item, |(start, _step)| start);
            for v in values.split('-') {
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                let ok = v.parse::<u32>().is_ok_and(|n| (min..=max).contains(&n));
                if !ok {
                    return Err(format!(
                        "{what} must be between {min} and {max} ('{v}' given)"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Reads and checks a cron file.
pub(crate) fn parse_file(path: &Path, limits: &Limits, tz: Tz) -> Result<Vec<CronLine>, CronError> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| CronError {
        file: label.clone(),
        line: 0,
        reason: format!("cannot read the cron file: {e}"),
    })?;
    parse_text(&label, &text, limits, tz)
}

/// Checks every line; the first bad one is the error.
pub(crate) fn parse_text(
    file: &str,
    text: &str,
    limits: &Limits,
    tz: Tz,
) -> Result<Vec<CronLine>, CronError> {
    let mut out: Vec<CronLine> = Vec::new();
    // Line number of each key seen so far: a repeated line is found without rescanning `out`.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |reason: String| CronError {
            file: file.to_string(),
            line,
            reason,
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with("//") || trimmed.starts_with('#') {
            continue;
        }
        let mut rest = trimmed;
        let mut tokens: Vec<&str> = Vec::with_capacity(TIME_FIELDS + 2);
        while tokens.len() < TIME_FIELDS + 2 {
            rest = rest.trim_start();
            if rest.is_empty() {
                break;
            }
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            tokens.push(&rest[..end]);
            rest = &rest[end..];
        }
        if tokens.len() < TIME_FIELDS + 2 {
            return Err(err(format!(
                "expected {TIME_FIELDS} time fields, a name and a method; found {} fields",
                tokens.len()
            )));
        }
        let expr = tokens[..TIME_FIELDS].join(" ");
        check_ranges(&tokens[..TIME_FIELDS])
            .map_err(|e| err(format!("bad time fields {expr:?}: {e}")))?;
        let schedule =
            Schedule::from_str(&expr).map_err(|e| err(format!("bad time fields {expr:?}: {e}")))?;
        let name = tokens[TIME_FIELDS].to_string();
        let method = Method::parse(tokens[TIME_FIELDS + 1]).ok_or_else(|| {
            err(format!(
                "unknown method {:?}; use GET, POST, EXEC or MAIL_TO",
                tokens[TIME_FIELDS + 1]
            ))
        })?;
        let params = rest.trim().to_string();
        let key = stable_key(&format!("{expr}|{name}|{}|{params}", method.as_str()));
        let cl = CronLine {
            line,
            key,
            expr,
            schedule,
            name,
            method,
            params,
        };
        parse_task(&cl.task_json(0), limits, true, 0).map_err(|e| err(e.to_string()))?;
        if cl.upcoming(Utc::now(), tz, 1).is_empty() {
            return Err(err(format!("{:?} never fires again", cl.expr)));
        }
        match seen.entry(cl.key.clone()) {
            Entry::Occupied(twin) => {
                return Err(err(format!(
                    "same schedule and task as line {}",
                    twin.get()
                )));
            }
            Entry::Vacant(v) => {
                v.insert(line);
            }
        }
        out.push(cl);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::ExecPolicy;

    fn limits() -> Limits {
        Limits {
            workers: 2,
            exec: ExecPolicy::Disabled,
            mail_enabled: false,
            mail_from: None,
        }
    }

    fn parse(text: &str) -> Result<Vec<CronLine>, String> {
        parse_text("crontab", text, &limits(), chrono_tz::UTC).map_err(|e| e.to_string())
    }

    #[test]
    fn good_lines() {
        let lines = parse(
            "// comment\n# another\n\n*/5 * * * * * *  http://svc/heartbeat  GET  src=cron\n\
             0 30 2 * * * *  /opt/jobs/backup.sh EXEC --full  /data\n\
             0 0 9 * * Mon-Fri * http://svc/x POST {\"a\": 1}\n",
        )
        .expect("valid");
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].line, 4);
        assert_eq!(lines[0].expr, "*/5 * * * * * *");
        assert_eq!(lines[0].params, "src=cron");
        assert_eq!(lines[1].method, Method::Exec);
        assert_eq!(
            lines[1].params, "--full  /data",
            "the rest of the line as written"
        );
        assert_eq!(lines[2].params, "{\"a\": 1}");
        // Keys are stable for the same text and differ for different lines.
        let again = parse("*/5 * * * * * *  http://svc/heartbeat  GET  src=cron").expect("valid");
        assert_eq!(again[0].key, lines[0].key);
        assert_ne!(lines[0].key, lines[1].key);
        assert_eq!(
            lines[0].firing_id(100),
            format!("cron-{}-100", lines[0].key)
        );
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let table = [
            (
                "* * * * * *  http://x GET",
                "crontab:1: expected 7 time fields",
            ),
            (
                "\n61 * * * * * * http://x GET",
                "crontab:2: bad time fields",
            ),
            (
                "* * * * * * * http://x PUT",
                "crontab:1: unknown method \"PUT\"",
            ),
            (
                "* * * * * * * ftp://x GET",
                "crontab:1: name: must be an http",
            ),
            (
                "* * * * * * * a@b.c MAIL_TO {}",
                "crontab:1: method: MAIL_TO is not available",
            ),
            (
                "* * * * * * * http://x POST {not json",
                "crontab:1: params: for POST must be JSON",
            ),
            (
                "0 0 0 1 1 * 2001 http://x GET",
                "crontab:1: \"0 0 0 1 1 * 2001\" never fires",
            ),
            (
                "* * * * * * * http://x GET\n* * * * * * * http://x GET",
                "crontab:2: same schedule",
            ),
        ];
        for (text, want) in table {
            let got = parse(text).expect_err(text);
            assert!(
                got.starts_with(want),
                "{text:?}: got {got:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn out_of_range_time_fields_say_the_true_range() {
        let table = [
            (
                "60 * * * * * *",
                "seconds must be between 0 and 59 ('60' given)",
            ),
            (
                "* 60 * * * * *",
                "minutes must be between 0 and 59 ('60' given)",
            ),
            (
                "* * 24 * * * *",
                "hours must be between 0 and 23 ('24' given)",
            ),
            (
                "* * * 0 * * *",
                "day of month must be between 1 and 31 ('0' given)",
            ),
            (
                "* * * 32 * * *",
                "day of month must be between 1 and 31 ('32' given)",
            ),
            (
                "* * * * 13 * *",
                "month must be between 1 and 12 ('13' given)",
            ),
            (
                "* * * * * 8 *",
                "day of week must be between 1 and 7 ('8' given)",
            ),
            (
                "* * * * * * 2101",
                "year must be between 1970 and 2100 ('2101' given)",
            ),
            (
                "50-60 * * * * * *",
                "seconds must be between 0 and 59 ('60' given)",
            ),
            (
                "1,60 * * * * * *",
                "seconds must be between 0 and 59 ('60' given)",
            ),
            (
                "60/5 * * * * * *",
                "seconds must be between 0 and 59 ('60' given)",
            ),
        ];
        for (expr, want) in table {
            let text = format!("{expr} http://x GET");
            let got = parse(&text).expect_err(&text);
            assert_eq!(
                got,
                format!("crontab:1: bad time fields {expr:?}: {want}"),
                "{text:?}"
            );
        }
        // The edges themselves are fine.
        parse("59 59 23 31 12 * 2100 http://x GET").expect("upper edges");
        parse("* * * * * 7 * http://x GET").expect("day of week 7");
        parse("0 0 0 1 1 1 * http://x GET").expect("lower edges");
    }

    #[test]
    fn a_hundred_thousand_lines_parse() {
        let mut text = String::new();
        for i in 0..100_000 {
            text.push_str(&format!("{} * * * * * * http://svc/x GET n={i}\n", i % 60));
        }
        text.push_str("7 * * * * * * http://svc/x GET n=7\n");
        let got = parse(&text).expect_err("the last line repeats line 8");
        assert_eq!(got, "crontab:100001: same schedule and task as line 8");
        let lines = parse(&text[..text.len() - 35]).expect("valid");
        assert_eq!(lines.len(), 100_000);
    }

    #[test]
    fn fire_times_follow_the_zone_and_skip_dst_gaps() {
        let berlin: Tz = "Europe/Berlin".parse().expect("zone");
        // 02:30 every day: on 2026-03-29 Berlin jumps from 02:00 to 03:00, so that day has none.
        let l = &parse_text("c", "0 30 2 * * * * http://x GET", &limits(), berlin).expect("ok")[0];
        let start = Utc
            .with_ymd_and_hms(2026, 3, 27, 12, 0, 0)
            .single()
            .expect("date");
        let times: Vec<String> = l
            .upcoming(start, berlin, 3)
            .iter()
            .map(|t| t.format("%Y-%m-%d %H:%M %Z").to_string())
            .collect();
        assert_eq!(
            times,
            vec![
                "2026-03-28 02:30 CET",
                "2026-03-30 02:30 CEST",
                "2026-03-31 02:30 CEST"
            ]
        );
        // In UTC terms 02:30 CET is 01:30Z.
        let next = l.next_after(start.timestamp(), berlin).expect("next");
        assert_eq!(
            next,
            Utc.with_ymd_and_hms(2026, 3, 28, 1, 30, 0)
                .single()
                .expect("d")
                .timestamp()
        );
        let every = &parse("* * * * * * * http://x GET").expect("ok")[0];
        assert_eq!(
            every.last_between(100, 105, chrono_tz::UTC, 1000),
            Some(105)
        );
        assert_eq!(every.last_between(100, 100, chrono_tz::UTC, 1000), None);
    }
}

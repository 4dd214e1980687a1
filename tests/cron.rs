//! Cron: an every-second line against a real sink (once per second, never early, no duplicate),
//! hot reload of a changed and of a broken file, SIGHUP, `--cron_catchup last` after a restart,
//! and `poulpe cron-check`.

mod common;
use common::{cpu_ticks, eventually, Server, Sink};
use std::collections::HashSet;
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

fn write(path: &std::path::Path, text: &str) {
    // Write then rename, so the server never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write cron file");
    std::fs::rename(&tmp, path).expect("rename cron file");
}

#[test]
fn every_second_line_fires_once_per_second_never_early() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let cron = dir.path().join("crontab");
    write(
        &cron,
        &format!(
            "// heartbeat\n* * * * * * *  {}  GET  src=a\n",
            sink.url("/beat")
        ),
    );
    let s = Server::builder(&dir)
        .args(&["--cron", cron.to_str().expect("utf8")])
        .start();
    sink.wait_until(Duration::from_secs(10), "4 beats", |h| {
        h.iter().filter(|h| h.path == "/beat").count() >= 4
    });
    let hits = sink.hits_on("/beat");
    let seconds: Vec<u64> = hits.iter().map(|h| h.at_us / 1_000_000).collect();
    let distinct: HashSet<u64> = seconds.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        seconds.len(),
        "one run per second: {seconds:?}"
    );
    for h in &hits {
        assert_eq!(h.query, "src=a");
        // A firing starts at the beginning of its second: a hit late in a second would mean it
        // fired early for the next one (or very late).
        let frac_ms = (h.at_us % 1_000_000) / 1000;
        assert!(frac_ms < 500, "hit {frac_ms} ms into its second");
    }
    let (_, info) = s.get("/sys_info");
    let line = &info["cron"][0];
    assert_eq!(line["line"], 2);
    assert_eq!(line["expr"], "* * * * * * *");
    assert_eq!(line["method"], "GET");
    assert!(
        line["last_id"].as_str().unwrap_or("").starts_with("cron-"),
        "{info}"
    );
    assert!(line["next"].is_string(), "{info}");
}

/// Each firing's sink arrival is never before the unix time in its id `cron-<key>-<time>`.
/// A line firing every 4 s lets each hit be tied to its firing without trusting the server's
/// clock: the one multiple of 4 in (arrival - 2.5 s, arrival + 1.5 s], whose id must exist.
#[test]
fn each_firing_reaches_the_sink_no_earlier_than_the_time_in_its_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let cron = dir.path().join("crontab");
    write(
        &cron,
        &format!("*/4 * * * * * *  {}  GET  src=e\n", sink.url("/e")),
    );
    let s = Server::builder(&dir)
        .args(&["--cron", cron.to_str().expect("utf8")])
        .start();
    sink.wait_until(Duration::from_secs(30), "3 firings", |h| {
        h.iter().filter(|h| h.path == "/e").count() >= 3
    });
    let (_, info) = s.get("/sys_info");
    let last = info["cron"][0]["last_id"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let key = last
        .strip_prefix("cron-")
        .and_then(|k| k.rsplit_once('-'))
        .map(|(k, _)| k.to_string())
        .unwrap_or_else(|| panic!("a cron-<key>-<time> last_id: {info}"));
    let mut seen = HashSet::new();
    for h in sink.hits_on("/e") {
        let ms = (h.at_us / 1000) as i64;
        let t = (ms / 1000 - 3..=ms / 1000 + 2)
            .find(|t| t % 4 == 0 && t * 1000 > ms - 2500 && t * 1000 <= ms + 1500)
            .expect("one multiple of 4 in a 4 s window");
        let id = format!("cron-{key}-{t}");
        let (code, r) = s.get(&format!("/task_resp/{id}?timeout=10"));
        assert_eq!(
            code, 200,
            "the firing {id} that reached the sink at {ms} ms: {r}"
        );
        assert!(
            h.at_us >= t as u64 * 1_000_000,
            "{id} reached the sink {} ms before its time",
            t * 1000 - ms
        );
        assert!(seen.insert(id.clone()), "{id} reached the sink twice");
    }
}

#[test]
fn changed_and_broken_files_are_reloaded_safely() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let cron = dir.path().join("crontab");
    write(
        &cron,
        &format!("* * * * * * * {} GET v=1\n", sink.url("/r")),
    );
    let mut s = Server::builder(&dir)
        .args(&["--cron", cron.to_str().expect("utf8")])
        .start();
    sink.wait_until(Duration::from_secs(10), "a v=1 hit", |h| {
        h.iter().any(|h| h.query == "v=1")
    });

    write(
        &cron,
        &format!("\n* * * * * * * {} GET v=2\n", sink.url("/r")),
    );
    sink.wait_until(Duration::from_secs(10), "a v=2 hit", |h| {
        h.iter().any(|h| h.query == "v=2")
    });

    // A broken version keeps the previous schedule and logs FILE:LINE: reason.
    write(&cron, "* * * * * * * http://x GET\n* * * nope\n");
    let label = format!("{}:2:", cron.display());
    eventually(
        Duration::from_secs(10),
        "the reload error in the log",
        || s.log_text().contains(&label).then_some(()),
    );
    let before = sink.hits_on("/r").len();
    sink.wait_until(
        Duration::from_secs(10),
        "two more firings: the old schedule keeps running",
        |h| h.iter().filter(|h| h.path == "/r").count() >= before + 2,
    );
    let after = sink.hits_on("/r");
    assert!(after.iter().skip(before).all(|h| h.query == "v=2"));

    // SIGHUP reloads too.
    write(
        &cron,
        &format!("* * * * * * * {} GET v=3\n", sink.url("/r")),
    );
    unsafe {
        libc::kill(s.child.as_ref().expect("running").id() as i32, libc::SIGHUP);
    }
    sink.wait_until(Duration::from_secs(10), "a v=3 hit", |h| {
        h.iter().any(|h| h.query == "v=3")
    });
    assert!(
        s.term().success(),
        "SIGHUP did not stop the server; SIGTERM exits 0"
    );
}

#[test]
fn catchup_last_runs_a_missed_firing_once_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let cron = dir.path().join("crontab");
    write(
        &cron,
        &format!("*/2 * * * * * * {} GET c=1\n", sink.url("/c")),
    );
    let args = [
        "--cron",
        cron.to_str().expect("utf8"),
        "--cron_catchup",
        "last",
    ];
    let mut s = Server::builder(&dir).args(&args).start();
    sink.wait_until(Duration::from_secs(10), "a firing", |h| !h.is_empty());
    assert!(s.term().success());
    let stopped_us = common::now_us();
    // A line added while poulpe is down (here before the other) has never fired: it has
    // nothing to catch up.
    write(
        &cron,
        &format!(
            "*/2 * * * * * * {} GET n=1\n*/2 * * * * * * {} GET c=1\n",
            sink.url("/n"),
            sink.url("/c")
        ),
    );
    // Down long enough to miss at least two firings.
    sleep(Duration::from_millis(4500));
    let before = sink.hits_on("/c").len();
    let s2 = Server::builder(&dir).args(&args).start();
    sink.wait_until(Duration::from_secs(5), "the catch-up firing", |h| {
        h.iter().filter(|h| h.path == "/c").count() > before
    });
    let caught = &sink.hits_on("/c")[before];
    assert!(caught.at_us > stopped_us);
    // Catch-up happens before the first scheduled firing: once the new line has fired, it is
    // over.
    sink.wait_until(
        Duration::from_secs(10),
        "the new line's first firing",
        |h| h.iter().any(|h| h.path == "/n"),
    );
    assert!(
        s2.log_text().contains("line 2 missed its firing"),
        "{}",
        s2.log_text()
    );
    assert_eq!(
        s2.log_text().matches("missed its firing").count(),
        1,
        "one catch-up per line, none for the new line: {}",
        s2.log_text()
    );
    drop(s2);

    // Without the flag, nothing is caught up.
    sleep(Duration::from_millis(4500));
    let before = sink.hits_on("/c").len();
    let s3 = Server::builder(&dir)
        .args(&["--cron", cron.to_str().expect("utf8")])
        .start();
    // Catch-up happens before the first scheduled firing: once that has run, it is too late.
    sink.wait_until(Duration::from_secs(10), "a scheduled firing", |h| {
        h.iter().filter(|h| h.path == "/c").count() > before
    });
    assert!(
        !s3.log_text().contains("missed its firing"),
        "{}",
        s3.log_text()
    );
}

#[test]
fn cron_check_prints_fire_times_and_refuses_bad_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good");
    std::fs::write(
        &good,
        "# nightly\n0 30 2 * * * * /opt/backup.sh EXEC --full\n0 0 12 * * * * http://svc/x GET a=1\n",
    )
    .expect("write");
    let out = Command::new(common::binary())
        .args([
            "cron-check",
            good.to_str().expect("utf8"),
            "--tz",
            "Europe/Berlin",
            "-n",
            "3",
        ])
        .output()
        .expect("run cron-check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(":2  0 30 2 * * * *  EXEC /opt/backup.sh --full"),
        "{text}"
    );
    assert_eq!(
        text.matches("02:30:00 CE").count(),
        3,
        "three fire times in Berlin time: {text}"
    );
    assert_eq!(text.matches("12:00:00 CE").count(), 3, "{text}");

    let bad = dir.path().join("bad");
    std::fs::write(&bad, "\n\n* * * * * * * http://x FETCH\n").expect("write");
    let out = Command::new(common::binary())
        .args(["cron-check", bad.to_str().expect("utf8")])
        .output()
        .expect("run cron-check");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:3: unknown method \"FETCH\"", bad.display())),
        "{err}"
    );

    // The server refuses the same file at start, with exit code 2.
    let out = Command::new(common::binary())
        .args(["--cron", bad.to_str().expect("utf8"), "--data"])
        .arg(dir.path().join("data"))
        .output()
        .expect("run poulpe");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(":3: unknown method"));
}

/// Programs named in the cron file are trusted: an EXEC line runs with neither `--exec_dir` nor
/// `--exec_any` (its retries too), while the same EXEC from the network is refused with 400.
#[test]
fn exec_from_the_cron_file_runs_without_exec_dir_but_not_from_the_network() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("runs.txt");
    let marker = dir.path().join("failed-once");
    // Appends its argument; the very first run fails once, so a retry has to run too.
    let script = dir.path().join("job.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1\" >> '{}'\n[ -e '{m}' ] || {{ : > '{m}'; exit 1; }}\n",
            out.display(),
            m = marker.display()
        ),
    )
    .expect("write script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let cron = dir.path().join("crontab");
    write(
        &cron,
        &format!("* * * * * * *  {}  EXEC  from-cron\n", script.display()),
    );
    let s = Server::builder(&dir)
        .args(&[
            "--cron",
            cron.to_str().expect("utf8"),
            "--retry_interval",
            "1",
        ])
        .start();
    let lines = eventually(Duration::from_secs(20), "3 runs of the cron EXEC", || {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let n = text.lines().count();
        (n >= 3).then_some(text)
    });
    assert!(
        lines.lines().all(|l| l == "from-cron"),
        "the line's arguments reach the program: {lines:?}"
    );
    // The firing whose first attempt failed was retried and succeeded.
    let failed = eventually(Duration::from_secs(10), "the failed firing's id", || {
        let (_, info) = s.get("/sys_info");
        info["wronging_keys"][0].as_str().map(str::to_string)
    });
    let r = eventually(Duration::from_secs(20), "its final result", || {
        match s.get(&format!("/task_resp/{failed}?timeout=5")) {
            (200, r) => Some(r),
            _ => None,
        }
    });
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["attempts"], 2, "{r}");

    // The same program from the network is refused: no --exec_dir, no --exec_any.
    let script = script.to_str().expect("utf8");
    let (code, body) = s.submit(&serde_json::json!({
        "id": "net-exec", "method": "EXEC", "name": script, "params": "from-network"}));
    assert_eq!(code, 400, "{body}");
    assert!(
        body["reason"].as_str().unwrap_or("").contains("--exec_dir"),
        "{body}"
    );
    let (code, _) = s.get("/task_resp/net-exec?timeout=0");
    assert_eq!(code, 404, "the refused task was not stored");
}

/// The cron thread sleeps until the next firing (waking once a second to look at the file): a
/// line that fires once a year costs next to no CPU.
#[test]
fn a_line_that_fires_rarely_does_not_keep_the_cpu_busy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let cron = dir.path().join("crontab");
    write(
        &cron,
        &format!("0 0 0 1 1 * *  {}  GET  src=y\n", sink.url("/yearly")),
    );
    let s = Server::builder(&dir)
        .args(&["--cron", cron.to_str().expect("utf8")])
        .start();
    // The line is with the cron thread before the measure starts.
    let (_, info) = s.get("/sys_info");
    assert!(info["cron"][0]["next"].is_string(), "{info}");
    let pid = s.pid().expect("running");
    let ticks = 100; // USER_HZ on Linux
    let before = cpu_ticks(pid);
    let wall = std::time::Instant::now();
    sleep(Duration::from_secs(3));
    let used = cpu_ticks(pid) - before;
    let elapsed = wall.elapsed().as_secs_f64();
    // As for a delayed task (tests/delay.rs): a spinning thread uses about half the wall time
    // or more, an idle poulpe next to none. A tenth.
    assert!(
        (used as f64) < elapsed * ticks as f64 / 10.0,
        "{used} ticks of CPU in {elapsed:.1} s while the only cron line waits for next year"
    );
}

/// Firings missed while the process could not run (stopped by SIGSTOP for 4.5 s) are not made
/// up one per missed second when it resumes: the first of them runs, then the line goes on
/// from the next second.
#[test]
fn firings_missed_while_stopped_run_once_not_once_per_missed_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let cron = dir.path().join("crontab");
    write(
        &cron,
        &format!("* * * * * * *  {}  GET  src=st\n", sink.url("/st")),
    );
    let s = Server::builder(&dir)
        .args(&["--cron", cron.to_str().expect("utf8")])
        .start();
    let key = eventually(Duration::from_secs(10), "a first firing", || {
        let (_, info) = s.get("/sys_info");
        let last = info["cron"][0]["last_id"].as_str()?.to_string();
        let key = last.strip_prefix("cron-")?.rsplit_once('-')?.0.to_string();
        Some(key)
    });
    s.signal(libc::SIGSTOP);
    let stopped_us = common::now_us();
    sleep(Duration::from_millis(4500));
    let resumed_us = common::now_us();
    s.signal(libc::SIGCONT);
    let found = |t: u64| {
        let (code, _) = s.get(&format!("/task_resp/cron-{key}-{t}?timeout=0"));
        code != 404
    };
    // A firing two seconds after the resume has run: any made-up firing came before it.
    let later = resumed_us / 1_000_000 + 2;
    eventually(Duration::from_secs(15), "a firing after the resume", || {
        found(later).then_some(())
    });
    let missed: Vec<u64> = (stopped_us / 1_000_000 + 1..resumed_us / 1_000_000).collect();
    assert!(missed.len() >= 3, "{missed:?}");
    let ran: Vec<u64> = missed.iter().copied().filter(|&t| found(t)).collect();
    assert!(
        ran.len() <= 1,
        "firings due while the process was stopped ran for {ran:?} of the missed seconds {missed:?}"
    );
}

/// Shell words of one command line: split at spaces, `'...'` kept as one word.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                }
                any = false;
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    assert!(!quoted, "unbalanced quote in {line:?}");
    if any {
        words.push(word);
    }
    words
}

/// The README's cron example passes `poulpe cron-check` run as the README shows it: the first
/// plain code block of its "Cron file" section, checked with the `poulpe cron-check` command
/// line of that section (its file argument replaced by the block). Each line is listed, and the
/// MAIL_TO line gets a note that the server needs `--smtp_server` to run it.
#[test]
fn the_readme_cron_example_passes_cron_check_as_documented() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("\n## Cron file\n")
        .expect("README has a Cron file section");
    let section = &readme[start + 1..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |e| e + 1)];
    let example = section
        .split("\n```\n")
        .nth(1)
        .expect("a plain code block (the cron example) in the Cron file section");
    let command = section
        .lines()
        .find(|l| l.starts_with("poulpe cron-check "))
        .expect("a `poulpe cron-check` command in the Cron file section");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("crontab");
    std::fs::write(&file, format!("{example}\n")).expect("write the example");
    let mut words = shell_words(command);
    assert!(words.len() >= 3, "{command}");
    words[2] = file.to_str().expect("utf8").to_string();
    let out = Command::new(common::binary())
        .args(&words[1..])
        .env_remove("POULPE_SMTP_FROM")
        .output()
        .expect("run cron-check");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "`{command}` on the README's example:\n{stdout}{stderr}\n--- example:\n{example}"
    );
    let lines = example
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("//") && !l.starts_with('#'))
        .count();
    assert!(
        stdout.contains(&format!(": {lines} lines,")),
        "{lines} lines: {stdout}"
    );
    let mail_lines: Vec<usize> = example
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(" MAIL_TO "))
        .map(|(i, _)| i + 1)
        .collect();
    assert!(!mail_lines.is_empty(), "the example has a MAIL_TO line");
    let note = stdout
        .lines()
        .find(|l| l.starts_with("note:") && l.contains("--smtp_server"))
        .unwrap_or_else(|| panic!("no note about --smtp_server: {stdout}"));
    for n in mail_lines {
        assert!(note.contains(&n.to_string()), "line {n} in {note:?}");
    }

    // Without a sender the MAIL_TO line is refused, pointing at --smtp_from; a bad one is too.
    let mut without: Vec<String> = words[1..].to_vec();
    if let Some(i) = without.iter().position(|w| w == "--smtp_from") {
        without.drain(i..i + 2);
    }
    let out = Command::new(common::binary())
        .args(&without)
        .env_remove("POULPE_SMTP_FROM")
        .output()
        .expect("run cron-check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{without:?}: {err}");
    assert!(
        err.contains("from_addr") && err.contains("--smtp_from"),
        "{err}"
    );
    let out = Command::new(common::binary())
        .args(&without)
        .args(["--smtp-from", "not an address"])
        .output()
        .expect("run cron-check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--smtp_from: bad value \"not an address\""),
        "{err}"
    );
}

/// With neither `--tz` nor `TZ`, cron follows the system's zone (the `/etc/localtime` link's
/// name), else UTC; `/sys_info` and `cron-check` say which zone and where it came from.
#[test]
fn the_zone_and_where_it_came_from_are_shown() {
    // What this machine's /etc/localtime names, if it is a link into a zoneinfo tree.
    let system = std::fs::read_link("/etc/localtime").ok().and_then(|t| {
        let t = t.to_string_lossy().into_owned();
        let name = t
            .rsplit_once("zoneinfo/")?
            .1
            .trim_start_matches("posix/")
            .to_string();
        name.parse::<chrono_tz::Tz>().ok().map(|_| name)
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("cron");
    std::fs::write(&file, "0 0 12 * * * * http://svc/x GET a=1\n").expect("write");
    let file = file.to_str().expect("utf8");
    for (args, tz_env, want_name, want_from) in [
        (
            &["--tz", "Asia/Tokyo"][..],
            "Europe/Paris",
            Some("Asia/Tokyo"),
            "--tz",
        ),
        (&[][..], "America/Lima", Some("America/Lima"), "TZ"),
        (&[][..], "", system.as_deref(), "/etc/localtime"),
    ] {
        let data = tempfile::tempdir().expect("tempdir");
        let mut all = vec!["--cron", file];
        all.extend_from_slice(args);
        let s = Server::builder(&data).args(&all).env("TZ", tz_env).start();
        let (_, info) = s.get("/sys_info");
        let (name, from) = (
            info["tz"]["name"].as_str().unwrap_or(""),
            info["tz"]["from"].as_str().unwrap_or(""),
        );
        match want_name {
            Some(want) => {
                assert_eq!(name, want, "{info}");
                assert!(from.starts_with(want_from), "{args:?} TZ={tz_env}: {info}");
            }
            // No zone link here: the system zone is /etc/timezone's, or UTC.
            None => assert!(!name.is_empty() && !from.is_empty(), "{info}"),
        }
        let out = Command::new(common::binary())
            .args(["cron-check", file])
            .args(args)
            .env("TZ", tz_env)
            .env_remove("POULPE_TZ")
            .output()
            .expect("run cron-check");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("times in {name} (from {from})")),
            "{text}"
        );
    }
}

//! The binary's command line: `--help`, `--version`, bad values (exit 2, one line naming the
//! flag), both flag spellings, `POULPE_*` environment variables, a locked data dir, a busy port.

mod common;
use common::{free_port, get, hits::hits_by_id, now_us, try_get, Server, Sink};
use serde_json::json;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A command for the binary with a clean environment (no inherited `POULPE_*` or `TZ`).
fn poulpe(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(common::binary());
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null());
    c
}

/// Runs to completion; kills it and panics when it is still running after 20 s (a process that
/// should have refused to start but serves instead).
fn run(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn poulpe");
    let (out, exited) = common::output_within(child, Duration::from_secs(20));
    assert!(
        exited,
        "poulpe did not exit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).expect("UTF-8 output")
}

/// Asserts exit code 2, nothing on stdout, and exactly one line on stderr that contains every
/// one of `needles`; returns that line.
fn assert_refused(out: &Output, needles: &[&str]) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {err}");
    assert_eq!(text(&out.stdout), "", "nothing on stdout");
    assert!(err.ends_with('\n'), "one whole line: {err:?}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr: {err:?}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing from {err:?}");
    }
    lines[0].to_string()
}

/// A poulpe process started by hand (not through the harness); killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proc {
    Proc(
        poulpe(args, env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn poulpe"),
    )
}

/// Waits until `/health` answers 200 on `port`; false when the process exits or 15 s pass.
fn healthy(p: &mut Proc, port: u16) -> bool {
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        if let Ok(Some(_)) = p.0.try_wait() {
            return false;
        }
        if let Ok((200, _)) = try_get(&format!("http://127.0.0.1:{port}/health")) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

fn workers_of(port: u16) -> usize {
    let (code, info) = try_get(&format!("http://127.0.0.1:{port}/sys_info")).expect("sys_info");
    assert_eq!(code, 200, "{info}");
    info["workers"].as_array().expect("workers array").len()
}

fn data_arg(dir: &Path) -> String {
    dir.join("data").to_str().expect("UTF-8 path").to_string()
}

#[test]
fn help_lists_every_flag_with_its_default() {
    let out = run(poulpe(&["--help"], &[]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(text(&out.stderr), "");
    let help = text(&out.stdout);
    // The README's flag table: every flag, and the default of those that have one.
    let flags: &[(&str, Option<&str>)] = &[
        ("port", Some("8000")),
        ("bind", Some("0.0.0.0")),
        ("data", Some("./poulpe-data")),
        ("redis", None),
        ("cron", None),
        ("dead", Some("<data>/dead")),
        ("workers", Some("4")),
        ("retry_interval", Some("10")),
        ("max_retry", Some("3")),
        ("backoff", Some("fixed")),
        ("task_timeout", Some("60")),
        ("result_ttl", Some("86400")),
        ("result_max", Some("1000000")),
        ("exec_dir", None),
        ("exec_any", None),
        ("token", None),
        ("max_body", Some("1048576")),
        ("max_ws", Some("256")),
        ("ws_idle", Some("300")),
        ("http_idle", Some("75")),
        ("max_conns", Some("1024")),
        ("smtp_server", None),
        ("smtp_port", None),
        ("smtp_name", None),
        ("smtp_pwd", None),
        ("starttls", None),
        ("smtp_tls", None),
        ("smtp_from", None),
        ("kafka_servers", None),
        ("kafka_topic", None),
        ("kafka_resp_topic", None),
        ("kafka_group", Some("poulpe")),
        ("kafka_offset_reset", Some("earliest")),
        ("tz", Some("UTC")),
        ("log", Some("info")),
    ];
    for (flag, default) in flags {
        let head = format!("--{flag}");
        let line = help
            .lines()
            .find(|l| {
                // `-p, --port`: the short name first, when there is one.
                let l = l.trim_start();
                let l = match l.split_once(", ") {
                    Some((short, rest)) if short.len() == 2 && short.starts_with('-') => rest,
                    _ => l,
                };
                l.strip_prefix(&head)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
            })
            .unwrap_or_else(|| panic!("--help does not list {head}:\n{help}"));
        if let Some(d) = default {
            assert!(
                line.contains(d),
                "the --help line of {head} does not show its default {d}: {line:?}"
            );
        }
    }
    assert!(help.contains("--version"), "{help}");
    assert!(
        help.contains("POULPE_"),
        "the environment is mentioned: {help}"
    );
}

#[test]
fn version_prints_name_and_version() {
    let out = run(poulpe(&["--version"], &[]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        text(&out.stdout),
        format!("poulpe {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(text(&out.stderr), "");
}

#[test]
fn bad_values_exit_2_with_one_line_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_arg(dir.path());
    let cases: &[(&[&str], &[&str])] = &[
        (&["--port", "x"], &["--port", "\"x\""]),
        (&["--port", "70000"], &["--port"]),
        (&["--workers", "0"], &["--workers"]),
        (&["--workers=-1"], &["--workers"]),
        (&["--backoff", "nope"], &["--backoff", "nope"]),
        (&["--tz", "Mars/X"], &["--tz", "Mars/X"]),
        (&["--retry-interval", "soon"], &["--retry_interval"]),
        (&["--log", "loud"], &["--log"]),
        (&["--bind", "localhost:80"], &["--bind"]),
        (&["--no-such-flag"], &["--no-such-flag"]),
        (&["--port"], &["--port"]),
        // A flag given twice is named as such, whatever its spelling.
        (
            &["--port", "1", "--port", "2"],
            &["--port", "given more than once"],
        ),
        (
            &["-p", "1", "--port=2"],
            &["--port", "given more than once"],
        ),
        (
            &["--retry-interval", "1", "--retry_interval", "2"],
            &["--retry_interval", "more than once"],
        ),
        (
            &["--starttls", "--starttls"],
            &["--starttls", "given more than once"],
        ),
        (
            &["--kafka_offset_reset", "sideways"],
            &["--kafka_offset_reset", "\"sideways\"", "earliest or latest"],
        ),
        (
            &["--kafka-offset-reset=sideways"],
            &["--kafka_offset_reset", "\"sideways\""],
        ),
    ];
    for (args, needles) in cases {
        let mut all = vec!["--data", &data];
        all.extend_from_slice(args);
        let line = assert_refused(&run(poulpe(&all, &[])), needles);
        assert!(line.starts_with("poulpe: "), "{args:?}: {line:?}");
    }
    // The same checks apply to values from the environment.
    let line = assert_refused(
        &run(poulpe(&["--data", &data], &[("POULPE_WORKERS", "0")])),
        &["--workers"],
    );
    assert!(line.contains("\"0\""), "{line}");
    assert_refused(
        &run(poulpe(&["--data", &data], &[("POULPE_BACKOFF", "linear")])),
        &["--backoff", "linear"],
    );
    assert_refused(
        &run(poulpe(
            &["--data", &data],
            &[("POULPE_KAFKA_OFFSET_RESET", "sideways")],
        )),
        &["--kafka_offset_reset", "sideways"],
    );
}

/// Both spellings set the same flag: retries come `--retry-interval` seconds apart (not the
/// default 10), and `--max-retry` bounds them.
#[test]
fn kebab_and_snake_case_flags_both_take_effect() {
    let sink = Sink::start();
    for (i, args) in [
        &["--retry-interval", "1", "--max_retry", "1", "--workers=3"][..],
        &["--retry_interval=1", "--max-retry=1", "--workers", "3"][..],
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Server::builder(&dir).args(args).start();
        let (code, info) = s.get("/sys_info");
        assert_eq!(code, 200);
        assert_eq!(info["workers"].as_array().map(Vec::len), Some(3), "{info}");
        let path = format!("/status/500/{i}");
        let (code, body) = s.submit(&json!({"id": format!("kebab-{i}"), "method": "GET",
            "name": sink.url(&path)}));
        assert_eq!(code, 200, "{body}");
        let (code, r) = s.get(&format!("/task_resp/kebab-{i}?timeout=30"));
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["status"], "dead", "{r}");
        assert_eq!(r["attempts"], 2, "--max_retry 1 means two attempts: {r}");
        let hits = sink.hits_on(&path);
        assert_eq!(hits.len(), 2, "{args:?}: {hits:?}");
        let gap_ms = (hits[1].at_us - hits[0].at_us) / 1000;
        assert!(
            (1000..5000).contains(&gap_ms),
            "{args:?}: retry came {gap_ms} ms after the first attempt, expected about 1 s"
        );
    }
}

#[test]
fn environment_sets_flags_and_the_command_line_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_arg(dir.path());

    let port = free_port();
    let p = port.to_string();
    let mut a = spawn(
        &["--bind", "127.0.0.1", "--data", &data],
        &[("POULPE_PORT", &p), ("POULPE_WORKERS", "2")],
    );
    assert!(healthy(&mut a, port), "POULPE_PORT={port} is used");
    assert_eq!(workers_of(port), 2, "POULPE_WORKERS=2 is used");
    drop(a);

    let (env_port, cli_port) = (free_port(), free_port());
    let (ep, cp) = (env_port.to_string(), cli_port.to_string());
    let mut b = spawn(
        &[
            "--bind",
            "127.0.0.1",
            "--data",
            &data,
            "--port",
            &cp,
            "--workers",
            "3",
        ],
        &[("POULPE_PORT", &ep), ("POULPE_WORKERS", "2")],
    );
    assert!(healthy(&mut b, cli_port), "--port {cli_port} wins");
    assert_eq!(
        workers_of(cli_port),
        3,
        "--workers 3 wins over POULPE_WORKERS"
    );
    assert!(
        try_get(&format!("http://127.0.0.1:{env_port}/health")).is_err(),
        "nothing listens on the environment's port"
    );
}

#[test]
fn second_server_on_the_same_data_dir_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let first = Server::builder(&dir).start();
    let data = first.data.to_str().expect("UTF-8").to_string();
    let port = free_port().to_string();
    let out = run(poulpe(
        &["--bind", "127.0.0.1", "--port", &port, "--data", &data],
        &[],
    ));
    let line = assert_refused(&out, &["--data", "poulpe.redb"]);
    assert!(
        line.to_lowercase().contains("lock") || line.contains("already open"),
        "says the store is in use: {line}"
    );
    // The first server is unharmed.
    let (code, body) = first.submit(&json!({"id": "still-1", "method": "GET",
        "name": sink.url("/still")}));
    assert_eq!(code, 200, "{body}");
    let (code, r) = first.get("/task_resp/still-1?timeout=30");
    assert_eq!((code, &r["status"]), (200, &json!("succeeded")), "{r}");
}

/// A busy port stops start-up with one line naming `--port`, before any stored task runs: a
/// server that cannot serve must not execute (and mark running) what it recovered.
#[test]
fn busy_port_exits_2_naming_port_and_runs_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let mut s = Server::builder(&dir).start();
    let data = s.data.clone();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            json!({"id": format!("p{i}"), "method": "GET", "name": sink.url("/parked"),
                   "params": format!("id=p{i}"), "delay": 1})
        })
        .collect();
    let sent_us = now_us();
    let (code, body) = s.submit(&json!(tasks));
    assert_eq!(code, 200, "{body}");
    s.kill9();
    while now_us() < sent_us + 1_200_000 {
        thread::sleep(Duration::from_millis(20));
    }

    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port().to_string();
    let data_s = data.to_str().expect("UTF-8").to_string();
    for _ in 0..5 {
        let out = run(poulpe(
            &["--bind", "127.0.0.1", "--port", &port, "--data", &data_s],
            &[],
        ));
        assert_refused(&out, &["--port", &port]);
    }
    // Every refused server has exited; a request of ours, answered, shows the sink has taken
    // in what came before it.
    assert_eq!(get(&sink.url("/marker")).0, 200);
    let early: Vec<_> = sink
        .hits()
        .into_iter()
        .filter(|h| h.path != "/marker")
        .collect();
    assert!(
        early.is_empty(),
        "a server that could not start ran {} tasks",
        early.len()
    );
    drop(busy);

    // The tasks are intact and run once the server can start, each exactly once.
    let started_us = now_us();
    let s2 = Server::builder(&dir).start();
    for i in 0..200 {
        let (code, r) = s2.get(&format!("/task_resp/p{i}?timeout=30"));
        assert_eq!(code, 200, "p{i}: {r}");
        assert_eq!(r["attempts"], 1, "p{i}: {r}");
    }
    // Every task is final: no attempt can come after this.
    let runs = hits_by_id(&sink.hits_on("/parked"));
    assert_eq!(runs.len(), 200, "every parked task ran");
    for (id, at) in &runs {
        assert_eq!(at.len(), 1, "{id} ran {} times", at.len());
        assert!(
            at[0] >= started_us,
            "{id} ran before the server that could start"
        );
    }
}

/// The one-letter flags of the original poulpe set the same settings as the long ones: the
/// server listens on `-p` with `-w` workers, reads `-c`, writes dead letters to `-d` after `-m`
/// retries `-i` seconds apart, and takes MAIL_TO with `-s`; `-k` is a switch (the flag after it
/// is not taken as its value). The SMTP ones are seen where they stop start-up.
#[test]
fn short_flags_of_the_original_set_the_same_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_arg(dir.path());
    let dead = dir.path().join("dead-here");
    let dead_s = dead.to_str().expect("UTF-8").to_string();
    let cron = dir.path().join("crontab");
    std::fs::write(&cron, "0 0 3 1 1 * * http://127.0.0.1:9/x GET a=1\n").expect("cron file");
    let cron_s = cron.to_str().expect("UTF-8").to_string();
    let port = free_port();
    let p = port.to_string();
    let closed = free_port();
    let mut s = spawn(
        &[
            "--bind",
            "127.0.0.1",
            "--data",
            &data,
            "-p",
            &p,
            "-w",
            "2",
            "-c",
            &cron_s,
            "-d",
            &dead_s,
            "-m",
            "1",
            "-i",
            "1",
            "-s",
            "127.0.0.1",
            "-x",
            "2525",
            "-k",
            "-n",
            "u",
            "-y",
            "pw",
        ],
        &[],
    );
    assert!(healthy(&mut s, port), "-p {port}: the server listens there");
    assert_eq!(workers_of(port), 2, "-w 2");
    let base = format!("http://127.0.0.1:{port}");
    let (_, info) = get(&format!("{base}/sys_info"));
    assert_eq!(info["cron"].as_array().map(Vec::len), Some(1), "-c: {info}");
    // -s enables MAIL_TO (delayed: it is only validated, never sent).
    let (code, body) = common::post_json(
        &format!("{base}/task_in_queue"),
        &json!({"method": "MAIL_TO", "name": "a@example.org", "delay": 3600,
                "params": {"from_addr": "f@example.org", "title": "t", "body": "b"}}),
    );
    assert_eq!(code, 200, "-s: MAIL_TO is accepted: {body}");
    // -m 1: two attempts, -i 1: a second apart (not the default 10 s), -d: the record is there.
    let (code, body) = common::post_json(
        &format!("{base}/task_in_queue"),
        &json!({"id": "short-1", "method": "GET",
                "name": format!("http://127.0.0.1:{closed}/refused")}),
    );
    assert_eq!(code, 200, "{body}");
    let (code, r) = get(&format!("{base}/task_resp/short-1?timeout=30"));
    assert_eq!((code, &r["status"]), (200, &json!("dead")), "{r}");
    assert_eq!(r["attempts"], 2, "-m 1 means two attempts: {r}");
    let record = std::fs::read_dir(&dead)
        .expect("-d: the dead-letter directory exists")
        .filter_map(Result::ok)
        .flat_map(|day| std::fs::read_dir(day.path()).into_iter().flatten())
        .filter_map(Result::ok)
        .find(|f| f.file_name() == "task-short-1.json");
    let record = record.unwrap_or_else(|| panic!("-d: no record of short-1 in {dead_s}"));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(record.path()).expect("read the record"))
            .expect("JSON record");
    let started: Vec<i64> = record["task"]["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .filter_map(|a| a["started_ms"].as_i64())
        .collect();
    assert_eq!(started.len(), 2, "{record}");
    let gap_ms = started[1] - started[0];
    assert!(
        (1000..10_000).contains(&gap_ms),
        "-i 1: the retry came {gap_ms} ms after the first attempt (the default is 10 s)"
    );
    drop(s);

    let cases: &[(&[&str], &[&str])] = &[
        (&["-p", "x"], &["--port", "\"x\""]),
        (&["-w", "0"], &["--workers"]),
        (&["-i", "soon"], &["--retry_interval"]),
        (&["-m", "101"], &["--max_retry"]),
        // These two get as far as opening the port: any free one.
        (&["-p", "0", "-r", "not a url"], &["--redis"]),
        (&["-p", "0", "-c", "/nonexistent/crontab"], &["--cron"]),
        (&["-s", "h", "-x", "0"], &["--smtp_port"]),
        (&["-s", "h", "-n", "u"], &["--smtp_pwd"]),
        (
            &["-s", "h", "-k", "--smtp_tls"],
            &["--starttls", "--smtp_tls"],
        ),
        (&["-p"], &["--port"]),
        (&["-p", "-w", "2"], &["--port"]),
    ];
    for (args, needles) in cases {
        let mut all = vec!["--data", &data, "--bind", "127.0.0.1"];
        all.extend_from_slice(args);
        assert_refused(&run(poulpe(&all, &[])), needles);
    }
    // -n and -y together are the AUTH pair: with both, the same server starts.
    let port = free_port();
    let p = port.to_string();
    let mut s = spawn(
        &[
            "--bind",
            "127.0.0.1",
            "--data",
            &data,
            "-p",
            &p,
            "-s",
            "h",
            "-n",
            "u",
            "-y",
            "pw",
        ],
        &[],
    );
    assert!(healthy(&mut s, port), "-s h -n u -y pw starts");
}

/// `--help` shows each flag's short name beside its long one.
#[test]
fn help_shows_the_short_names() {
    let out = run(poulpe(&["--help"], &[]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let help = text(&out.stdout);
    for (short, long) in [
        ("-p", "--port"),
        ("-r", "--redis"),
        ("-c", "--cron"),
        ("-w", "--workers"),
        ("-s", "--smtp_server"),
        ("-x", "--smtp_port"),
        ("-n", "--smtp_name"),
        ("-y", "--smtp_pwd"),
        ("-i", "--retry_interval"),
        ("-m", "--max_retry"),
        ("-k", "--starttls"),
        ("-d", "--dead"),
    ] {
        let head = format!("{short}, {long}");
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{head} ")) || l.trim_start() == head),
            "--help has no line starting with {head:?}:\n{help}"
        );
    }
}

/// A bad value from the environment names the variable it came from, and still the flag.
#[test]
fn a_bad_environment_value_names_the_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_arg(dir.path());
    let line = assert_refused(
        &run(poulpe(&["--data", &data], &[("POULPE_PORT", "abc")])),
        &["POULPE_PORT", "--port", "\"abc\""],
    );
    assert!(line.starts_with("poulpe: "), "{line}");
    assert_refused(
        &run(poulpe(
            &["--data", &data],
            &[("POULPE_RETRY_INTERVAL", "soon")],
        )),
        &["POULPE_RETRY_INTERVAL", "--retry_interval", "soon"],
    );
    // So is one checked with the settings it goes with (here the SMTP relay's).
    let line = assert_refused(
        &run(poulpe(
            &["--data", &data, "--smtp_server", "h"],
            &[("POULPE_SMTP_PORT", "0")],
        )),
        &["POULPE_SMTP_PORT", "--smtp_port"],
    );
    assert!(line.contains("between 1 and 65535"), "{line}");
    // The same bad value on the command line names no variable.
    let line = assert_refused(
        &run(poulpe(&["--data", &data, "-p", "abc"], &[])),
        &["--port"],
    );
    assert!(!line.contains("POULPE_"), "{line}");
}

/// `poulpe --help` lists the subcommands; `poulpe cron-check --help`, `poulpe health --help` and
/// `poulpe replay --help` print their own help and exit 0.
#[test]
fn help_lists_the_subcommands_which_have_their_own_help() {
    let out = run(poulpe(&["--help"], &[]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let help = text(&out.stdout);
    for cmd in ["health", "cron-check", "replay"] {
        let lines: Vec<&str> = help
            .lines()
            .filter(|l| l.trim_start().starts_with(&format!("poulpe {cmd} ")))
            .collect();
        assert_eq!(lines.len(), 1, "one line for {cmd}:\n{help}");
    }
    for (cmd, needles) in [
        (
            "cron-check",
            &["poulpe cron-check FILE", "--tz", "-n", "--smtp_from"][..],
        ),
        ("health", &["poulpe health", "--host", "--port"][..]),
        (
            "replay",
            &["poulpe replay FILE_OR_DIR", "--host", "--port", "--token"][..],
        ),
    ] {
        for flag in ["--help", "-h"] {
            let out = run(poulpe(&[cmd, flag], &[]));
            assert_eq!(out.status.code(), Some(0), "{cmd} {flag}: {out:?}");
            assert_eq!(text(&out.stderr), "", "{cmd} {flag}");
            let h = text(&out.stdout);
            for n in needles {
                assert!(h.contains(n), "{cmd} {flag}: {n:?} missing:\n{h}");
            }
        }
    }
}

/// An unreachable Redis at start is one line: the flag, the URL without its password (also a
/// `pass=` in a socket URL's query), and the reason, with no prefix said twice.
#[test]
fn unreachable_redis_is_one_clear_line_without_the_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_arg(dir.path());
    let closed = free_port();
    let tcp = format!("redis://:s3cret-pw@127.0.0.1:{closed}/0");
    let unix = "redis+unix:///nonexistent-dir/redis.sock?db=0&pass=s3cret-pw".to_string();
    let runs: Vec<_> = [tcp, unix]
        .into_iter()
        .map(|url| {
            let data = data.clone();
            thread::spawn(move || {
                let out = run(poulpe(
                    &[
                        "--data",
                        &data,
                        "--bind",
                        "127.0.0.1",
                        "--port",
                        "0",
                        "--redis",
                        &url,
                    ],
                    &[],
                ));
                (url, out)
            })
        })
        .collect();
    let mut lines = Vec::new();
    for r in runs {
        let (url, out) = r.join().expect("run");
        let line = assert_refused(&out, &["cannot reach Redis at"]);
        assert!(
            !line.contains("s3cret"),
            "{url}: the password shows: {line}"
        );
        for word in ["store unavailable", "cannot reach", "redis: ", "--redis"] {
            assert!(
                line.matches(word).count() <= 1,
                "{url}: {word:?} said more than once: {line}"
            );
        }
        assert!(
            line.starts_with("poulpe: --redis: cannot reach Redis at "),
            "{line}"
        );
        lines.push(line);
    }
    assert!(
        lines[0].contains(&format!("redis://***@127.0.0.1:{closed}/0")),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("redis+unix:///nonexistent-dir/redis.sock"),
        "{}",
        lines[1]
    );
}

//! `poulpe replay`: dead-letter records submitted again to a running server, each once, and
//! nothing at all when one file is broken.

mod common;
use common::{binary, eventually, free_port, post_raw, request, Server, Sink};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const TOKEN: &str = "r3play";
const AUTH: &str = "Bearer r3play";

/// Runs `poulpe replay ARGS` without `POULPE_*` settings from the test's environment.
fn replay(args: &[&str]) -> Output {
    Command::new(binary())
        .arg("replay")
        .args(args)
        .env_remove("POULPE_PORT")
        .env_remove("POULPE_TOKEN")
        .output()
        .expect("run poulpe replay")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The exit code, with both outputs in the message when it is not `want`.
fn assert_exit(out: &Output, want: i32) -> (String, String) {
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(want), "stdout:\n{o}\nstderr:\n{e}");
    (o, e)
}

/// Accepted tasks so far, from `/sys_info`.
fn accepted(s: &Server) -> u64 {
    let (code, info) = request("GET", &s.url("/sys_info"), &[("Authorization", AUTH)]);
    assert_eq!(code, 200, "{info}");
    info["counts"]["accepted"]
        .as_u64()
        .expect("counts.accepted")
}

/// Submits `t` with the token; expects 200.
fn submit(s: &Server, t: &Value) {
    let (code, r) = post_raw(
        &s.url("/task_in_queue"),
        t.to_string().as_bytes(),
        &[("Authorization", AUTH)],
    );
    assert_eq!(code, 200, "{r}");
}

/// Writes a dead-letter record of `task` (the stored fields the server adds included) at
/// `<dead>/2026-01-01/task-<id>.json`, as `--dead` would; returns its path.
fn record(dead: &Path, task: Value) -> PathBuf {
    let mut task = task;
    let id = task["id"].as_str().expect("id").to_string();
    for (k, v) in [
        ("submitted_ms", json!(1_700_000_000_000i64)),
        ("due_us", json!(1_700_000_000_000_000u64)),
        ("delay", json!(30)),
        ("state", json!("running")),
        (
            "attempts",
            json!([{"started_ms":1,"finished_ms":2,"worker":0,"ok":false,"code":500,
                    "error":"HTTP 500","output_excerpt":""}]),
        ),
    ] {
        task[k] = v;
    }
    let result = json!({"id":id,"result":"Fail","reason":"HTTP 500","status":"dead",
                        "attempts":1,"output":"","code":500,"submitted_at":"","finished_at":""});
    write(
        dead,
        &format!("task-{id}.json"),
        &json!({"task":task,"result":result}).to_string(),
    )
}

fn write(dead: &Path, name: &str, body: &str) -> PathBuf {
    let day = dead.join("2026-01-01");
    std::fs::create_dir_all(&day).expect("mkdir");
    let p = day.join(name);
    std::fs::write(&p, body).expect("write record");
    p
}

fn replayed(p: &Path) -> PathBuf {
    suffixed(p, ".replayed")
}

fn suffixed(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// A server with the token whose results expire after 1 s, and its task `id`, a GET of `path`
/// on a free port (`fields` added to it), dead at its first attempt since nothing listens
/// there yet: the server, its dead-letter folder, the task's record and the port.
fn dead_task(dir: &Path, id: &str, path: &str, fields: Value) -> (Server, PathBuf, PathBuf, u16) {
    let s = Server::builder(dir)
        .args(&["--token", TOKEN, "--result_ttl", "1"])
        .start();
    let dead = dir.join("data/dead");
    let port = free_port();
    let mut t = json!({"id": id, "method": "GET", "name": format!("http://127.0.0.1:{port}{path}"),
                       "max_retry": 0, "timeout": 5});
    if let (Some(t), Some(extra)) = (t.as_object_mut(), fields.as_object()) {
        t.extend(extra.clone());
    }
    submit(&s, &t);
    let file = dead_record(&dead, id);
    (s, dead, file, port)
}

/// The dead-letter record of task `id` under `dead`, once the server has written it.
fn dead_record(dead: &Path, id: &str) -> PathBuf {
    let name = format!("task-{id}.json");
    eventually(Duration::from_secs(20), "the dead-letter record", || {
        std::fs::read_dir(dead)
            .ok()?
            .filter_map(|d| d.ok())
            .map(|d| d.path().join(&name))
            .find(|p| p.exists())
    })
}

/// Waits until the server no longer holds a result for `id` (`--result_ttl` ran out).
fn wait_expired(s: &Server, id: &str) {
    eventually(Duration::from_secs(20), "the result to expire", || {
        let (code, _) = request(
            "GET",
            &s.url(&format!("/task_resp/{id}?timeout=0")),
            &[("Authorization", AUTH)],
        );
        (code == 404).then_some(())
    });
}

/// A real dead task's record, once its result has expired, runs again through `poulpe replay`
/// (with the server's token; without it the server refuses and the file stays), is renamed, and
/// a second replay of the folder submits nothing.
#[test]
fn a_dead_task_runs_again_once_after_its_result_expired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, dead, file, sink_port) = dead_task(
        dir.path(),
        "rp-1",
        "/again",
        json!({"params":"a=1","headers":{"X-Replay":"yes"}}),
    );
    wait_expired(&s, "rp-1");
    let sink = Sink::start_on(sink_port);
    let port = s.port.to_string();
    let dead_s = dead.to_str().expect("utf-8");

    let (o, _) = assert_exit(&replay(&[dead_s, "--port", &port]), 1);
    assert!(o.contains("refused") && o.contains("401"), "{o}");
    assert!(file.exists(), "a refused record keeps its name");
    assert_eq!(accepted(&s), 1);

    let (o, _) = assert_exit(&replay(&[dead_s, "-p", &port, "--token", TOKEN]), 0);
    assert!(
        o.contains(&format!("replayed {} as rp-1", file.display())),
        "{o}"
    );
    assert!(o.contains("1 replayed"), "{o}");
    assert!(!file.exists(), "{o}");
    assert!(replayed(&file).exists(), "{o}");
    sink.wait_until(Duration::from_secs(20), "the replayed task", |h| {
        h.iter().any(|h| h.path == "/again")
    });
    let hit = &sink.hits_on("/again")[0];
    assert_eq!(hit.query, "a=1");
    assert!(
        hit.headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("x-replay") && v == "yes"),
        "{:?}",
        hit.headers
    );
    let (code, r) = request(
        "GET",
        &s.url("/task_resp/rp-1?timeout=30"),
        &[("Authorization", AUTH)],
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], "succeeded", "{r}");

    // Again: nothing is submitted, and it says so.
    let (o, _) = assert_exit(&replay(&[dead_s, "-p", &port, "--token", TOKEN]), 0);
    assert!(
        o.contains(&format!(
            "skipped {}: already replayed",
            replayed(&file).display()
        )),
        "{o}"
    );
    assert!(o.contains("0 replayed, 1 already replayed"), "{o}");
    assert_eq!(accepted(&s), 2, "the first submit and one replay");
    assert_eq!(sink.hits_on("/again").len(), 1);
}

/// A dead task retried through the API (`POST /task/{id}/retry`) has its dead-letter record
/// renamed to `.retried` (kept): a later replay of the folder, once the new result has
/// expired, does not run it once more.
#[test]
fn a_task_retried_through_the_api_is_not_replayed_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, dead, file, sink_port) = dead_task(dir.path(), "ar-1", "/api", json!({}));
    let sink = Sink::start_on(sink_port);
    let (code, r) = request(
        "POST",
        &s.url("/task/ar-1/retry"),
        &[("Authorization", AUTH)],
    );
    assert_eq!(code, 200, "{r}");
    sink.wait_until(Duration::from_secs(20), "the retried task", |h| {
        h.len() == 1
    });
    assert!(
        !file.exists() && suffixed(&file, ".retried").exists(),
        "the record is kept as .retried"
    );
    wait_expired(&s, "ar-1");
    let port = s.port.to_string();
    let (o, _) = assert_exit(
        &replay(&[dead.to_str().expect("utf-8"), "-p", &port, "--token", TOKEN]),
        0,
    );
    assert!(
        o.contains("0 replayed, 0 already replayed, 0 not replayed"),
        "{o}"
    );
    assert_eq!(sink.hits().len(), 1, "the task ran once after its retry");
}

/// One broken file among good ones: exit 2 naming it and what is wrong, nothing submitted,
/// nothing renamed. Without it, the good ones replay.
#[test]
fn a_broken_file_stops_the_whole_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--token", TOKEN]).start();
    let dead = dir.path().join("dead");
    let good: Vec<PathBuf> = ["g-1", "g-2"]
        .iter()
        .map(|id| {
            record(
                &dead,
                json!({"id":id,"method":"POST","name":sink.url("/good"),"params":"{\"k\":1}",
                       "cc":[0],"max_retry":2,"retry_interval":1,"timeout":9}),
            )
        })
        .collect();
    // A temporary file of the dead-letter writer is no record and is left alone.
    write(&dead, ".task-g-3.json.tmp", "half a wri");
    let port = s.port.to_string();
    let dead_s = dead.to_str().expect("utf-8");
    let cases = [
        ("{\"task\":", "not JSON"),
        ("{\"task\":{\"id\":\"b\"}}", "not a dead-letter record: no \"result\" object"),
        ("{\"result\":{},\"task\":{\"method\":\"GET\",\"name\":\"http://x/\"}}", "no \"id\""),
        (
            "{\"result\":{},\"task\":{\"id\":\"b\",\"method\":\"FETCH\",\"name\":\"http://x/\"}}",
            "the server would refuse its task: method: unknown method \"FETCH\"",
        ),
        (
            "{\"result\":{},\"task\":{\"id\":\"b\",\"method\":\"GET\",\"name\":\"http://x/\",\"timeout\":0}}",
            "timeout: must be at least 1 second",
        ),
    ];
    for (body, why) in cases {
        let bad = write(&dead, "task-b.json", body);
        let (_, e) = assert_exit(&replay(&[dead_s, "-p", &port, "--token", TOKEN]), 2);
        assert!(e.contains(&format!("{}: ", bad.display())), "{e}");
        assert!(e.contains(why), "{why}: {e}");
        assert!(e.contains("nothing was submitted"), "{e}");
        for g in &good {
            assert!(g.exists(), "{} was renamed", g.display());
        }
    }
    // A missing input is bad usage too.
    let missing = dir.path().join("nowhere");
    let (_, e) = assert_exit(
        &replay(&[dead_s, missing.to_str().expect("utf-8"), "-p", &port]),
        2,
    );
    assert!(e.contains("nowhere"), "{e}");
    assert_eq!(accepted(&s), 0);
    assert!(sink.hits().is_empty());

    std::fs::remove_file(dead.join("2026-01-01/task-b.json")).expect("rm");
    let (o, _) = assert_exit(&replay(&[dead_s, "-p", &port, "--token", TOKEN]), 0);
    assert!(
        o.contains("2 replayed, 0 already replayed, 0 not replayed"),
        "{o}"
    );
    let at = |id: &str| o.find(&format!(" as {id}\n")).expect(id);
    assert!(
        at("g-1") < at("g-2"),
        "records are replayed in name order: {o}"
    );
    sink.wait_until(Duration::from_secs(20), "both tasks", |h| h.len() == 2);
    for h in sink.hits() {
        assert_eq!((h.method.as_str(), h.body.as_str()), ("POST", "{\"k\":1}"));
    }
    assert!(dead.join("2026-01-01/.task-g-3.json.tmp").exists());
}

/// The server refuses some records: each is named with the reason and kept (a task still
/// pending under that id, or finished but its result still held; a cron-made EXEC task on a
/// server without `--exec_dir`); a second
/// record of a task replayed from another file waits; the others replay; exit 1.
#[test]
fn records_the_server_refuses_are_reported_and_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--token", TOKEN]).start();
    submit(
        &s,
        &json!({"id":"p-1","method":"GET","name":sink.url("/later"),"delay":300}),
    );
    let (code, r) = common::post_raw(
        &s.url("/task_in_queue"),
        json!({"id":"h-1","method":"GET","name":sink.url("/held"),"wait":10})
            .to_string()
            .as_bytes(),
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    );
    assert_eq!(
        (code, r["status"].as_str()),
        (200, Some("succeeded")),
        "{r}"
    );
    let dead = dir.path().join("dead");
    let held = record(
        &dead,
        json!({"id":"h-1","method":"GET","name":sink.url("/held")}),
    );
    let pending = record(
        &dead,
        json!({"id":"p-1","method":"GET","name":sink.url("/later")}),
    );
    let exec = record(
        &dead,
        json!({"id":"x-1","method":"EXEC","name":"true","args":["a b","c"],"trusted":true}),
    );
    let fine = record(
        &dead,
        json!({"id":"f-1","method":"GET","name":sink.url("/fine")}),
    );
    // The same task died twice: one of its records is replayed, the other waits.
    let twin = dead.join("2026-01-02/task-f-1.json");
    std::fs::create_dir_all(twin.parent().expect("day")).expect("mkdir");
    std::fs::copy(&fine, &twin).expect("copy");
    let port = s.port.to_string();
    // One file named on the command line and again through its folder: replayed once.
    let (o, _) = assert_exit(
        &replay(&[
            fine.to_str().expect("utf-8"),
            dead.to_str().expect("utf-8"),
            "--port",
            &port,
            "--token",
            TOKEN,
        ]),
        1,
    );
    assert!(
        o.contains(&format!(
            "refused {}: the server still holds p-1 (delayed)",
            pending.display()
        )),
        "{o}"
    );
    // A task run again since (POST /task/{id}/retry) and finished: its result is still held,
    // and replaying its old dead record would run it once more.
    assert!(
        o.contains(&format!(
            "refused {}: the server still holds h-1 (succeeded)",
            held.display()
        )),
        "{o}"
    );
    assert_eq!(sink.hits_on("/held").len(), 1, "h-1 ran again");
    assert!(
        o.contains(&format!("refused {}: 400 ", exec.display())) && o.contains("exec"),
        "{o}"
    );
    assert!(
        o.contains(&format!("replayed {} as f-1", fine.display())),
        "{o}"
    );
    assert_eq!(o.matches(" as f-1").count(), 1, "{o}");
    assert!(
        o.contains(&format!(
            "skipped {}: f-1 is replayed from another file",
            twin.display()
        )),
        "{o}"
    );
    assert!(
        o.contains("1 replayed, 0 already replayed, 4 not replayed"),
        "{o}"
    );
    assert!(
        pending.exists() && held.exists() && exec.exists() && twin.exists(),
        "{o}"
    );
    assert!(replayed(&fine).exists(), "{o}");
    sink.wait_until(Duration::from_secs(20), "the fine task", |h| {
        h.iter().any(|h| h.path == "/fine")
    });
}

/// A server that is down: a clear message, exit 1, nothing renamed.
#[test]
fn a_server_that_is_down_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dead = dir.path().join("dead");
    let file = record(
        &dead,
        json!({"id":"d-1","method":"GET","name":"http://127.0.0.1:9/x"}),
    );
    let port = free_port().to_string();
    let (_, e) = assert_exit(&replay(&[dead.to_str().expect("utf-8"), "-p", &port]), 1);
    assert!(
        e.contains(&format!(
            "cannot reach the server at http://127.0.0.1:{port}/task_in_queue"
        )),
        "{e}"
    );
    assert!(e.contains("1 file(s) not submitted"), "{e}");
    assert!(file.exists());
}

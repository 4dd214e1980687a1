//! Results: `wait` on submit, the `/task_resp` long poll (202 pending, 200 final, not consumed,
//! `task-<id>` alias, 404), `/sys_info` and `/health`.

mod common;
use common::{Server, Sink};
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
fn wait_returns_the_final_result_or_202_when_it_runs_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let (code, r) = s.submit(&json!({"id":"w-1","method":"GET","name":sink.url("/x"),"wait":10}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["id"], "w-1");
    assert_eq!(r["result"], "OK", "{r}");
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["attempts"], 1, "{r}");
    assert_eq!(r["output"], "ok", "{r}");
    assert_eq!(r["code"], 200, "{r}");
    for k in ["submitted_at", "finished_at"] {
        assert!(r[k].as_str().is_some_and(|t| t.ends_with('Z')), "{k}: {r}");
    }

    let t0 = Instant::now();
    let (code, r) = s.submit(&json!({"id":"w-2","method":"GET","name":sink.url("/slow"),
                                      "params":"ms=3000","wait":1}));
    assert_eq!(code, 202, "{r}");
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "202 after {:?}, before the 1 s wait ran out",
        t0.elapsed()
    );
    assert_eq!(r["result"], "Timeout", "{r}");
    assert_eq!(r["id"], "w-2", "{r}");

    // An array with wait answers every id.
    let (code, r) = s.submit(&json!([
        {"id":"wa-1","method":"GET","name":sink.url("/a"),"wait":10},
        {"id":"wa-2","method":"GET","name":sink.url("/b"),"wait":10}
    ]));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["ids"], json!(["wa-1", "wa-2"]), "{r}");
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{r}");
    assert!(results.iter().all(|x| x["result"] == "OK"), "{r}");
}

#[test]
fn long_poll_pending_then_final_and_not_consumed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    assert_eq!(
        s.submit(&json!({"id":"lp-1","method":"GET","name":sink.url("/lp"),"delay":2}))
            .0,
        200
    );
    let t0 = Instant::now();
    let (code, r) = s.get("/task_resp/lp-1?timeout=0");
    assert_eq!(code, 202, "{r}");
    assert_eq!(r["status"], "delayed", "{r}");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "timeout=0 answers at once"
    );
    let t1 = Instant::now();
    let (code, r) = s.get("/task_resp/lp-1?timeout=1");
    assert_eq!(code, 202, "{r}");
    assert!(
        t1.elapsed() >= Duration::from_secs(1),
        "202 after {:?}, before the 1 s timeout ran out",
        t1.elapsed()
    );
    let (code, r) = s.get("/task_resp/lp-1?timeout=20");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"], "OK", "{r}");
    // Reading does not consume it, and the task- alias names the same result.
    let (code, again) = s.get("/task_resp/lp-1?timeout=0");
    assert_eq!(code, 200);
    assert_eq!(again, r);
    let (code, alias) = s.get("/task_resp/task-lp-1?timeout=0");
    assert_eq!(code, 200);
    assert_eq!(alias["id"], "lp-1");
    assert_eq!(s.get("/task_resp/never-submitted?timeout=0").0, 404);
}

#[test]
fn sys_info_and_health() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--workers", "3"]).start();
    assert_eq!(
        s.submit(&json!({"id":"si-1","method":"GET","name":sink.url("/slow"),"params":"ms=1500"}))
            .0,
        200
    );
    assert_eq!(
        s.submit(&json!({"id":"si-2","method":"GET","name":sink.url("/x"),"delay":60}))
            .0,
        200
    );
    sink.wait_until(Duration::from_secs(5), "the slow task", |h| !h.is_empty());
    let (code, info) = s.get("/sys_info");
    assert_eq!(code, 200, "{info}");
    for k in [
        "working_keys",
        "delaying_keys",
        "wronging_keys",
        "channel_sizes",
        "workers",
        "counts",
        "uptime_s",
        "version",
        "store",
    ] {
        assert!(!info[k].is_null(), "/sys_info lacks {k}: {info}");
    }
    assert_eq!(info["working_keys"], json!(["si-1"]), "{info}");
    assert_eq!(info["delaying_keys"], json!(["si-2"]), "{info}");
    assert_eq!(info["workers"].as_array().map(Vec::len), Some(3), "{info}");
    assert_eq!(
        info["channel_sizes"].as_array().map(Vec::len),
        Some(3),
        "{info}"
    );
    assert_eq!(info["counts"]["accepted"], 2, "{info}");
    assert_eq!(info["store"]["kind"], "embedded", "{info}");
    let (code, h) = s.get("/health");
    assert_eq!(code, 200);
    assert_eq!(h["status"], "ok");
}

#[test]
fn results_beyond_result_max_are_dropped_oldest_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir)
        .args(&["--result_max", "1000"])
        .start();
    common::results::check_result_max(&s, &sink);
    let files = [
        s.data.join("poulpe.redb"),
        s.data.join("poulpe.journal"),
        s.data.join("poulpe.journal2"),
    ];
    common::eventually(
        Duration::from_secs(10),
        "data_bytes equal to the sizes of data/poulpe.redb and both journal files",
        || {
            let (_, info) = s.get("/sys_info");
            let len: u64 = files
                .iter()
                .map(|f| std::fs::metadata(f).expect("the store's files").len())
                .sum();
            (info["data_bytes"].as_u64() == Some(len)).then_some(())
        },
    );
}

#[test]
fn a_result_is_readable_until_result_ttl_then_404() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--result_ttl", "3"]).start();
    let t = json!({"id":"ttl-1","method":"GET","name":sink.url("/t"),"wait":10});
    common::results::check_result_expires(&s, &t, 3);
}

//! Immediate GET and POST tasks against a real local sink.

mod common;
use common::{Server, Sink};
use serde_json::json;
use std::time::Duration;

#[test]
fn immediate_get_reaches_the_sink_with_its_query() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let (code, body) =
        s.submit(&json!({"id":"g-1","method":"GET","name":sink.url("/hit"),"params":"a=1&b=two"}));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["result"], "OK");
    assert_eq!(body["id"], "g-1");
    sink.wait_until(Duration::from_secs(10), "the GET", |h| {
        h.iter().any(|h| h.path == "/hit")
    });
    let hit = &sink.hits_on("/hit")[0];
    assert_eq!(hit.method, "GET");
    assert_eq!(hit.query, "a=1&b=two");
}

#[test]
fn post_sends_json_bodies_given_as_string_or_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let as_value =
        json!({"id":"p-v","method":"POST","name":sink.url("/v"),"params":{"k":1,"s":"é"}});
    let as_string =
        json!({"id":"p-s","method":"POST","name":sink.url("/s"),"params":"{\"a\":[1,2]}"});
    for t in [&as_value, &as_string] {
        let (code, body) = s.submit(t);
        assert_eq!(code, 200, "{body}");
    }
    sink.wait_until(Duration::from_secs(10), "both POSTs", |h| h.len() >= 2);
    let v = &sink.hits_on("/v")[0];
    assert_eq!(v.method, "POST");
    assert!(v.content_type.starts_with("application/json"), "{v:?}");
    let got: serde_json::Value = serde_json::from_str(&v.body).expect("JSON body");
    assert_eq!(got, json!({"k":1,"s":"é"}));
    let st = &sink.hits_on("/s")[0];
    assert!(st.content_type.starts_with("application/json"), "{st:?}");
    let got: serde_json::Value = serde_json::from_str(&st.body).expect("JSON body");
    assert_eq!(got, json!({"a":[1,2]}));
}

#[test]
fn get_params_are_appended_to_an_existing_query() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let t = json!({"id":"q-1","method":"GET","name":sink.url("/q?x=1"),"params":"y=2"});
    assert_eq!(s.submit(&t).0, 200);
    sink.wait_until(Duration::from_secs(10), "the GET", |h| !h.is_empty());
    assert_eq!(sink.hits_on("/q")[0].query, "x=1&y=2");
}

#[test]
fn a_non_2xx_answer_is_a_failed_attempt_with_its_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let t =
        json!({"id":"n-1","method":"GET","name":sink.url("/status/404"),"max_retry":0,"wait":10});
    let (code, r) = s.submit(&t);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"], "Fail", "{r}");
    assert_eq!(r["status"], "dead", "{r}");
    assert_eq!(r["code"], 404, "{r}");
    assert!(r["reason"].as_str().unwrap_or("").contains("404"), "{r}");
}

/// A task cancelled while it waits in its worker's queue leaves the queue at once (it does not
/// hold its place until the worker reaches it), and never runs.
#[test]
fn delete_takes_a_queued_task_out_of_its_workers_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--workers", "1"]).start();
    let busy = json!({"id":"q-busy","method":"GET","name":sink.url("/slow?ms=5000")});
    assert_eq!(s.submit(&busy).0, 200);
    sink.wait_until(Duration::from_secs(10), "the slow task", |h| !h.is_empty());
    let queued = json!({"id":"q-1","method":"GET","name":sink.url("/never")});
    assert_eq!(s.submit(&queued).0, 200);
    let (_, info) = s.get("/sys_info");
    assert_eq!(info["channel_sizes"], json!([1]), "q-1 queued: {info}");
    let (code, r) = common::request("DELETE", &s.url("/task/q-1"), &[]);
    assert_eq!((code, &r["reason"]), (200, &json!("cancelled")), "{r}");
    let (_, info) = s.get("/sys_info");
    assert_eq!(
        info["working_keys"],
        json!(["q-busy"]),
        "still running: {info}"
    );
    assert_eq!(
        info["channel_sizes"],
        json!([0]),
        "the cancelled task is out of the queue while q-busy runs: {info}"
    );
    // Once a task queued after it has run, the cancelled one would have too.
    let marker = json!({"id":"q-marker","method":"GET","name":sink.url("/marker")});
    assert_eq!(s.submit(&marker).0, 200);
    let (code, r) = s.get("/task_resp/q-marker?timeout=30");
    assert_eq!((code, &r["result"]), (200, &json!("OK")), "{r}");
    assert!(sink.hits_on("/never").is_empty(), "the cancelled task ran");
}

/// A cancelled task never runs; it finishes with status `cancelled`: the clients waiting for
/// it (a long poll, a `wait` submit) are answered at once, and its result is kept like any
/// other's.
#[test]
fn delete_cancels_a_delayed_task_before_it_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).start();
    let t = json!({"id":"d-1","method":"GET","name":sink.url("/never"),"delay":3});
    assert_eq!(s.submit(&t).0, 200);
    // Due after d-1: once it has run, d-1's time has passed too.
    let marker = json!({"id":"d-marker","method":"GET","name":sink.url("/marker"),"delay":3});
    assert_eq!(s.submit(&marker).0, 200);
    // Clients waiting for d-1 and for d-2 (a `wait` submit) before the cancels.
    let poll_url = s.url("/task_resp/d-1?timeout=30");
    let poll = std::thread::spawn(move || common::get(&poll_url));
    let submit_url = s.url("/task_in_queue");
    let d2 = json!({"id":"d-2","method":"GET","name":sink.url("/never"),"delay":60,"wait":30});
    let waiting = std::thread::spawn(move || common::post_json(&submit_url, &d2));
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while s.get("/task_resp/d-2?timeout=0").0 == 404 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200)); // the long poll is parked by now
    for id in ["d-1", "d-2"] {
        let (code, r) = common::request("DELETE", &s.url(&format!("/task/{id}")), &[]);
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["reason"], "cancelled", "{r}");
    }
    for (who, (code, r)) in [
        ("the long poll", poll.join().expect("poll")),
        ("the wait submit", waiting.join().expect("wait")),
    ] {
        assert_eq!(code, 200, "{who} is answered with the result: {r}");
        assert_eq!(
            (&r["status"], &r["result"], &r["reason"], &r["attempts"]),
            (
                &json!("cancelled"),
                &json!("Fail"),
                &json!("cancelled"),
                &json!(0)
            ),
            "{who}: {r}"
        );
    }
    // Finished now: a second cancel is refused as for any finished task.
    let (code, r) = common::request("DELETE", &s.url("/task/d-1"), &[]);
    assert_eq!(code, 409, "a second cancel: {r}");
    assert_eq!(common::request("DELETE", &s.url("/task/nope"), &[]).0, 404);
    let (code, r) = s.get("/task_resp/d-marker?timeout=20");
    assert_eq!(code, 200, "the task due after the cancelled one ran: {r}");
    assert_eq!(r["result"], "OK", "{r}");
    assert!(sink.hits_on("/never").is_empty(), "the cancelled task ran");
    let (code, r) = s.get("/task_resp/d-1?timeout=0");
    assert_eq!(
        (code, &r["status"]),
        (200, &json!("cancelled")),
        "kept: {r}"
    );
    let (_, info) = s.get("/sys_info");
    assert_eq!(info["counts"]["cancelled"], 2, "{info}");
    // A cancelled id may be used again.
    let t = json!({"id":"d-1","method":"GET","name":sink.url("/again")});
    assert_eq!(s.submit(&t).0, 200);
    sink.wait_until(Duration::from_secs(10), "the resubmitted task", |h| {
        h.iter().any(|h| h.path == "/again")
    });
}

/// A task's `headers` go with its GET or POST (a POST's own `Content-Type` replaces
/// `application/json`); the values, which may be secrets, are never logged; bad ones are
/// refused naming the field.
#[test]
fn headers_go_with_the_request_and_are_not_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--log", "debug"]).start();
    let get = json!({"id":"h-get","method":"GET","name":sink.url("/h-get"),"wait":10,
                     "headers":{"Authorization":"Bearer s3cret-token","X-Trace":"t-1"}});
    let post = json!({"id":"h-post","method":"POST","name":sink.url("/h-post"),"wait":10,
                      "params":{"k":2},"headers":{"Content-Type":"application/vnd.api+json"}});
    let plain = json!({"id":"h-json","method":"POST","name":sink.url("/h-json"),"wait":10,
                       "params":{"k":1}});
    for t in [&get, &post, &plain] {
        let (code, r) = s.submit(t);
        assert_eq!((code, &r["status"]), (200, &json!("succeeded")), "{r}");
    }
    let headers = |path: &str, name: &str| -> Vec<String> {
        let hits = sink.hits_on(path);
        assert_eq!(hits.len(), 1, "{path}");
        hits[0]
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert_eq!(headers("/h-get", "authorization"), ["Bearer s3cret-token"]);
    assert_eq!(headers("/h-get", "x-trace"), ["t-1"]);
    assert_eq!(
        headers("/h-post", "content-type"),
        ["application/vnd.api+json"],
        "one Content-Type"
    );
    assert_eq!(headers("/h-json", "content-type"), ["application/json"]);
    for (bad, why) in [
        (json!({"Host": "other"}), "set by poulpe"),
        (json!({"X-A": "a\r\nX-Injected: 1"}), "control characters"),
        (json!({"X A": "a"}), "not a header name"),
    ] {
        let t = json!({"method":"GET","name":sink.url("/bad"),"headers": bad});
        let (code, r) = s.submit(&t);
        assert_eq!(code, 400, "{r}");
        let reason = r["reason"].as_str().unwrap_or("");
        assert!(
            reason.starts_with("headers: ") && reason.contains(why),
            "{r}"
        );
    }
    assert!(sink.hits_on("/bad").is_empty());
    assert!(
        !s.log_text().contains("s3cret"),
        "a header value was logged:\n{}",
        s.log_text()
    );
}

/// An HTTP attempt is cut at its time limit: `--task_timeout` when the task gives none, else
/// the task's own `timeout`, shorter or longer than the default.
#[test]
fn http_attempts_are_cut_at_their_own_or_the_default_time_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir)
        .args(&["--task_timeout", "2", "--max_retry", "0"])
        .start();
    let slow = |id: &str, ms: u64, timeout: Option<u64>| {
        let mut t = json!({"id": id, "method": "GET", "name": sink.url("/slow"),
                           "params": format!("ms={ms}")});
        if let Some(t2) = timeout {
            t["timeout"] = json!(t2);
        }
        let (code, r) = s.submit(&t);
        assert_eq!(code, 200, "{r}");
    };
    slow("to-default", 5000, None);
    slow("to-shorter", 1500, Some(1));
    slow("to-longer", 3000, Some(6));
    let done = |id: &str| {
        let (code, r) = s.get(&format!("/task_resp/{id}?timeout=30"));
        assert_eq!(code, 200, "{id}: {r}");
        r
    };
    let r = done("to-default");
    assert_eq!(r["status"], "dead", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("timed out after 2 s"),
        "cut at --task_timeout: {r}"
    );
    let r = done("to-shorter");
    assert_eq!(r["status"], "dead", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("timed out after 1 s"),
        "cut at its own timeout: {r}"
    );
    let r = done("to-longer");
    assert_eq!(r["status"], "succeeded", "not cut at --task_timeout: {r}");
}

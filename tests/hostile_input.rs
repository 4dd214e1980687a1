//! Every kind of bad input gets a 4xx naming the problem, changes nothing, and the server keeps
//! serving.

mod common;
use common::{post_raw, request, Server, Sink};
use serde_json::json;
use std::time::Duration;

#[test]
fn bad_tasks_get_400_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--workers", "2"]).start();
    let good = sink.url("/x");
    let cases = [
        (json!({"method":"FETCH","name":good}), "method"),
        (json!({"name":good}), "method"),
        (json!({"method":"GET"}), "name"),
        (json!({"method":"GET","name":"not a url"}), "name"),
        (json!({"method":"GET","name":"ftp://host/x"}), "name"),
        (json!({"method":"GET","name":good,"delay":-1}), "delay"),
        (json!({"method":"GET","name":good,"delay":1e12}), "delay"),
        (json!({"method":"GET","name":good,"delay":"soon"}), "delay"),
        (json!({"method":"GET","name":good,"wait":100000}), "wait"),
        (json!({"method":"GET","name":good,"timeout":0}), "timeout"),
        (
            json!({"method":"GET","name":good,"max_retry":1000}),
            "max_retry",
        ),
        (json!({"method":"GET","name":good,"cc":"9"}), "cc"),
        (json!({"method":"GET","name":good,"id":""}), "id"),
        (json!({"method":"GET","name":good,"id":"a/b\n"}), "id"),
        (
            json!({"method":"GET","name":good,"id":"x".repeat(1000)}),
            "id",
        ),
        (
            json!({"method":"POST","name":good,"params":"{not json"}),
            "params",
        ),
        (json!({"method":"MAIL_TO","name":"a@b.c"}), "MAIL_TO"),
        // A typo must not change the task silently (it would run at once).
        (
            json!({"method":"GET","name":good,"dealy":30}),
            r#"unknown field "dealy" (did you mean "delay"?)"#,
        ),
        (
            json!({"method":"GET","name":good,"priority":1}),
            r#"unknown field "priority" (known: id,"#,
        ),
        (json!("just a string"), "object"),
        (json!(42), "object"),
        (json!([]), "empty"),
    ];
    for (task, word) in &cases {
        let (code, r) = s.submit(task);
        assert_eq!(code, 400, "{task}: {r}");
        assert_eq!(r["result"], "Fail", "{task}: {r}");
        let reason = r["reason"].as_str().unwrap_or("");
        assert!(
            reason.to_lowercase().contains(&word.to_lowercase()),
            "{task}: the reason should name {word:?}: {reason}"
        );
        // Only a task in an array of several is named by its place.
        assert!(
            task.is_array() || !reason.starts_with("task 0"),
            "{task}: a task sent alone is not numbered: {reason}"
        );
    }
    // Nothing was accepted.
    let (_, info) = s.get("/sys_info");
    assert_eq!(info["counts"]["accepted"], 0, "{info}");

    // An array with one bad task accepts none of them, and says which one.
    let arr = json!([
        {"id":"arr-ok","method":"GET","name":good},
        {"id":"arr-bad","method":"GET","name":good,"delay":-5}
    ]);
    let (code, r) = s.submit(&arr);
    assert_eq!(code, 400, "{r}");
    assert!(
        r["reason"].as_str().unwrap_or("").starts_with("task 1: "),
        "{r}"
    );
    assert_eq!(
        s.get("/task_resp/arr-ok?timeout=0").0,
        404,
        "half an array was accepted"
    );

    // A duplicate id of an unfinished task is 409, and so is a repeat inside one array.
    let d = json!({"id":"dup","method":"GET","name":good,"delay":60});
    assert_eq!(s.submit(&d).0, 200);
    assert_eq!(s.submit(&d).0, 409);
    let twice =
        json!([{"id":"tw","method":"GET","name":good},{"id":"tw","method":"GET","name":good}]);
    assert_eq!(s.submit(&twice).0, 409);

    still_serves(&s, &sink);
}

#[test]
fn malformed_requests_get_4xx() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--max_body", "2048"]).start();
    let url = s.url("/task_in_queue");
    let (code, r) = post_raw(&url, b"{\"method\":", &[]);
    assert_eq!(code, 400, "{r}");
    assert!(r["reason"].as_str().unwrap_or("").contains("JSON"), "{r}");
    let (code, r) = post_raw(&url, &[0xff, 0xfe, b'{', b'}'], &[]);
    assert_eq!(code, 400, "bad UTF-8: {r}");
    let (code, r) = post_raw(&url, b"", &[]);
    assert_eq!(code, 400, "empty body: {r}");
    let big = format!(
        "{{\"method\":\"GET\",\"name\":\"{}\",\"params\":\"{}\"}}",
        sink.url("/x"),
        "a".repeat(4096)
    );
    let (code, r) = post_raw(&url, big.as_bytes(), &[]);
    assert_eq!(code, 413, "{r}");
    assert!(
        r["reason"].as_str().unwrap_or("").contains("--max_body"),
        "{r}"
    );
    // A body of exactly --max_body bytes is read; one byte more is refused.
    let task = json!({"id": "at-limit", "method": "GET", "name": sink.url("/limit")}).to_string();
    let at_limit = format!("{task}{}", " ".repeat(2048 - task.len()));
    assert_eq!(at_limit.len(), 2048);
    let (code, r) = post_raw(&url, at_limit.as_bytes(), &[]);
    assert_eq!((code, &r["id"]), (200, &json!("at-limit")), "{r}");
    let (code, r) = post_raw(&url, format!("{at_limit} ").as_bytes(), &[]);
    assert_eq!(code, 413, "one byte over --max_body: {r}");
    // Deep nesting within the size limit reaches the parser, which refuses it by name.
    let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    let (code, r) = post_raw(&url, deep.as_bytes(), &[]);
    assert_eq!(code, 400, "deep nesting: {r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("recursion limit"),
        "deep nesting is named: {r}"
    );
    assert_eq!(request("GET", &s.url("/no/such/thing"), &[]).0, 404);
    assert_eq!(request("GET", &url, &[]).0, 405);
    assert_eq!(request("PUT", &s.url("/sys_info"), &[]).0, 405);
    assert_eq!(request("DELETE", &s.url("/sys_info"), &[]).0, 405);
    assert_eq!(request("POST", &s.url("/task_resp/x"), &[]).0, 405);
    assert_eq!(
        request("GET", &s.url("/task/x"), &[]).0,
        404,
        "GET /task/{{id}}: unknown"
    );
    assert_eq!(request("PUT", &s.url("/task/x"), &[]).0, 405);
    assert_eq!(request("POST", &s.url("/task/x"), &[]).0, 405);
    assert_eq!(request("POST", &s.url("/task/x/cancel"), &[]).0, 405);
    let (code, r) = request("DELETE", &s.url("/task/"), &[]);
    assert_eq!(code, 400, "a cancel without an id: {r}");
    let (code, r) = request("GET", &s.url("/task_resp/"), &[]);
    assert_eq!(code, 400, "a long poll without an id: {r}");
    // A long poll of at most 300 s.
    let (code, r) = request("GET", &s.url("/task_resp/x?timeout=301"), &[]);
    assert_eq!(code, 400, "a long poll beyond 300 s: {r}");
    assert!(
        r["reason"].as_str().unwrap_or("").contains("timeout"),
        "{r}"
    );
    let (code, r) = request("GET", &s.url("/task_resp/x?timeout=300"), &[]);
    assert_eq!(
        code, 404,
        "300 s is allowed (an unknown id answers at once): {r}"
    );
    let (code, r) = request("GET", &s.url("/task_resp/%ff%fe"), &[]);
    assert_eq!(code, 400, "a bad id in the path: {r}");
    assert!(r["reason"].as_str().unwrap_or("").contains("id"), "{r}");
    still_serves(&s, &sink);
}

fn still_serves(s: &Server, sink: &Sink) {
    let (code, r) = s.submit(&json!({"method":"GET","name":sink.url("/alive"),"wait":10}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"], "OK", "{r}");
    sink.wait_until(Duration::from_secs(5), "the good task", |h| {
        h.iter().any(|h| h.path == "/alive")
    });
}

//! `--token`: every endpoint but `/health` needs `Authorization: Bearer <token>`.

mod common;
use common::{post_raw, request, Server, Sink};
use serde_json::json;

#[test]
fn the_token_is_required_everywhere_but_health() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::builder(&dir).args(&["--token", "s3cret"]).start();
    let task = json!({"id":"au-1","method":"GET","name":sink.url("/x")}).to_string();
    let url = s.url("/task_in_queue");

    for auth in [
        None,
        Some("Bearer wrong"),
        Some("s3cret"),
        Some("Bearer s3cre"),
        Some("Basic czNjcmV0"),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
        let (code, r) = post_raw(&url, task.as_bytes(), &headers);
        assert_eq!(code, 401, "{auth:?}: {r}");
        for path in ["/sys_info", "/task_resp/au-1?timeout=0"] {
            assert_eq!(
                request("GET", &s.url(path), &headers).0,
                401,
                "{path} {auth:?}"
            );
        }
        assert_eq!(request("DELETE", &s.url("/task/au-1"), &headers).0, 401);
    }
    assert!(sink.hits().is_empty(), "a refused submit ran");

    let ok = [("Authorization", "Bearer s3cret")];
    let (code, r) = post_raw(&url, task.as_bytes(), &ok);
    assert_eq!(code, 200, "{r}");
    let (code, r) = request("GET", &s.url("/task_resp/au-1?timeout=10"), &ok);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"], "OK");
    assert_eq!(request("GET", &s.url("/sys_info"), &ok).0, 200);
    assert_eq!(
        request("GET", &s.url("/health"), &[]).0,
        200,
        "health needs no token"
    );
    assert!(
        !s.log_text().contains("s3cret"),
        "the token must never be logged"
    );
}

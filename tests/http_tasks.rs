//! Immediate GET and POST tasks against a real local sink.

mod common;
use common::{Server, Sink};
use serde_json::json;
use std::time::Duration;

#[test]
fn immediate_get_reaches_the_sink_with_its_query() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start();
    let s = Server::start(&dir, &[]);
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

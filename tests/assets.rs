//! The embedded documents: `/` redirects to the dashboard page `/ui`, and `/openapi.json` is
//! the API document; both are sent gzip-compressed, and without the token (they hold no data).

mod common;
use common::{request, Server};
use std::io::Read;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into()
}

/// Status, the named header, and the gunzipped body of a GET sent with `Accept-Encoding: gzip`.
fn get_gzip(url: &str, header: &str) -> (u16, Option<String>, Vec<u8>) {
    let mut r = agent()
        .get(url)
        .header("Accept-Encoding", "gzip")
        .call()
        .expect("GET");
    let status = r.status().as_u16();
    let named = r
        .headers()
        .get(header)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let encoding = r
        .headers()
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let raw = r.body_mut().read_to_vec().expect("body");
    if encoding.as_deref() != Some("gzip") {
        return (status, named, raw);
    }
    let mut body = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_end(&mut body)
        .expect("a valid gzip body");
    (status, named, body)
}

#[test]
fn the_page_and_the_api_document_are_served_compressed_without_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--token", "s3cret"]).start();

    let (code, location, _) = get_gzip(&s.url("/"), "location");
    assert_eq!((code, location.as_deref()), (302, Some("/ui")));

    let (code, kind, page) = get_gzip(&s.url("/ui"), "content-type");
    assert_eq!(code, 200);
    assert_eq!(kind.as_deref(), Some("text/html; charset=utf-8"));
    assert_eq!(page, std::fs::read("ui/index.html").expect("ui/index.html"));

    let (code, kind, doc) = get_gzip(&s.url("/openapi.json"), "content-type");
    assert_eq!(code, 200);
    assert_eq!(kind.as_deref(), Some("application/json"));
    let doc: serde_json::Value = serde_json::from_slice(&doc).expect("JSON");
    assert_eq!(doc["openapi"], "3.1.0", "{doc}");
    assert!(doc["paths"]["/health"].is_object(), "{doc}");

    // The data stays behind the token.
    assert_eq!(request("GET", &s.url("/sys_info"), &[]).0, 401);
}

#[test]
fn a_client_refusing_gzip_is_told_how_to_ask_and_other_methods_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).start();
    for path in ["/ui", "/openapi.json"] {
        let (code, r) = request("GET", &s.url(path), &[("Accept-Encoding", "identity")]);
        assert_eq!(code, 406, "{path}: {r}");
        let reason = r["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("Accept-Encoding: gzip"), "{path}: {r}");
        let (code, r) = request("POST", &s.url(path), &[("Accept-Encoding", "gzip")]);
        assert_eq!(code, 405, "{path}: {r}");
    }
}

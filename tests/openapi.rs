//! The API document (`docs/openapi.yaml`, served as `/openapi.json`) against the real server:
//! it lists exactly the routes the router serves, each answering as documented, and
//! schemathesis (installed by `scripts/test.sh`) generates requests from it, hostile ones
//! included, and checks every answer against it.

mod common;
use common::Server;
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

const TOKEN: &str = "s3cret";

/// Every operation the router serves, as the document names them (method, path).
const ROUTES: [(&str, &str); 15] = [
    ("post", "/task_in_queue"),
    ("get", "/task_resp/{id}"),
    ("get", "/task/{id}"),
    ("delete", "/task/{id}"),
    ("post", "/task/{id}/retry"),
    ("get", "/tasks"),
    ("post", "/tasks/retry"),
    ("get", "/sys_info"),
    ("get", "/metrics"),
    ("post", "/pause"),
    ("post", "/resume"),
    ("get", "/health"),
    ("get", "/ui"),
    ("get", "/openapi.json"),
    ("get", "/"),
];

/// Operations that need no token (they hold no data).
const PUBLIC: [&str; 4] = ["/health", "/ui", "/openapi.json", "/"];

/// Status and body of a request, redirects not followed.
fn call(method: &str, url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let mut b = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let mut r = agent.run(b.body(()).expect("request")).expect("an answer");
    let body = r.body_mut().read_to_string().unwrap_or_default();
    (r.status().as_u16(), body)
}

/// The served document, gunzipped and parsed.
fn served_document(s: &Server) -> Value {
    let mut r = ureq::get(&s.url("/openapi.json"))
        .header("Accept-Encoding", "gzip")
        .call()
        .expect("GET /openapi.json");
    let raw = r.body_mut().read_to_vec().expect("body");
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_end(&mut json)
        .expect("a gzip body");
    serde_json::from_slice(&json).expect("the document is JSON")
}

/// Each operation of the document: (method, path, operation).
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    let paths = doc["paths"].as_object().expect("paths");
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("a path item") {
            if method != "parameters" {
                out.push((method.clone(), path.clone(), op.clone()));
            }
        }
    }
    out
}

#[test]
fn the_document_lists_exactly_the_routes_and_each_answers_as_documented() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--token", TOKEN]).start();
    let doc = served_document(&s);
    assert_eq!(doc["openapi"], "3.1.0");

    let ops = operations(&doc);
    let mut documented: Vec<(&str, &str)> = ops
        .iter()
        .map(|(m, p, _)| (m.as_str(), p.as_str()))
        .collect();
    documented.sort();
    let mut routes = ROUTES.to_vec();
    routes.sort();
    assert_eq!(
        documented, routes,
        "the document's operations are the routes"
    );
    let ids: Vec<&str> = ops
        .iter()
        .filter_map(|(_, _, op)| op["operationId"].as_str())
        .collect();
    assert_eq!(ids.len(), ops.len(), "every operation has an operationId");
    for id in ["listTasks", "getTask", "retryTask", "retryTasks"] {
        assert!(ids.contains(&id), "{id} is documented");
    }
    assert!(
        doc["info"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("/ws_task")),
        "the WebSocket endpoint is described"
    );
    assert_eq!(doc["security"], serde_json::json!([{"bearer": []}]));

    let auth = format!("Bearer {TOKEN}");
    for (method, path, op) in &ops {
        let public = PUBLIC.contains(&path.as_str());
        if public {
            assert_eq!(op["security"], serde_json::json!([]), "{method} {path}");
        } else {
            assert!(
                op.get("security").is_none(),
                "{method} {path} needs the token"
            );
            assert!(op["responses"]["401"].is_object(), "{method} {path}: 401");
        }
        // The route is served, with a documented status: an unknown id, an empty body or no
        // query give a documented refusal, never "no such endpoint" nor 405.
        let url = s.url(&path.replace("{id}", "no-such-task")) + "?timeout=0";
        let headers = [
            ("Authorization", auth.as_str()),
            ("Accept-Encoding", "gzip"),
        ];
        let (code, body) = call(&method.to_uppercase(), &url, &headers);
        assert!(
            op["responses"][code.to_string()].is_object(),
            "{method} {path}: {code} {body} is not documented"
        );
        assert!(
            !body.contains("no such endpoint"),
            "{method} {path} is served: {body}"
        );
        if !public {
            let (code, _) = call(&method.to_uppercase(), &url, &[]);
            assert_eq!(code, 401, "{method} {path} without the token");
        }
    }
    call("POST", &s.url("/resume"), &[("Authorization", &auth)]);
}

/// RFC 9110: a 405 must name the methods the target allows. Each documented path answers a
/// method it does not serve with 405 and `Allow` listing exactly its served methods.
#[test]
fn a_method_a_route_does_not_serve_gets_405_naming_those_it_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--token", TOKEN]).start();
    let doc = served_document(&s);
    let auth = format!("Bearer {TOKEN}");
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let mut methods: Vec<String> = item
            .as_object()
            .expect("a path item")
            .iter()
            .filter(|(m, _)| *m != "parameters")
            .map(|(m, _)| m.to_uppercase())
            .collect();
        if methods.is_empty() {
            continue;
        }
        if path == "/health" {
            methods.push("HEAD".to_string());
        }
        methods.sort();
        let url = s.url(&path.replace("{id}", "x"));
        for other in ["PUT", "PATCH", "TRACE"] {
            let r = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .allow_non_standard_methods(true)
                .build()
                .new_agent()
                .run(
                    ureq::http::Request::builder()
                        .method(other)
                        .uri(&url)
                        .header("Authorization", &auth)
                        .body(())
                        .expect("request"),
                )
                .expect("an answer");
            assert_eq!(r.status().as_u16(), 405, "{other} {path}");
            let allow = r
                .headers()
                .get("allow")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let mut named: Vec<&str> = allow.split(',').map(str::trim).collect();
            named.sort();
            assert_eq!(named, methods, "{other} {path}: Allow {allow:?}");
        }
    }
}

/// The `st` program next to the test Python (`target/test-venv`), or a failure saying how to
/// install it.
fn schemathesis() -> PathBuf {
    let python = std::env::var_os("POULPE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python")
        });
    let st = python.with_file_name("st");
    let ok = Command::new(&st)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "the API contract test needs schemathesis ({}): run scripts/test.sh, which installs \
         it into target/test-venv (or set POULPE_TEST_PYTHON to a venv's python that has it)",
        st.display()
    );
    st
}

/// The last lines of a log.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Sets the value at `pointer` in `doc` (which must be there).
fn set(doc: &mut Value, pointer: &str, value: Value) {
    *doc.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer} is in the document")) = value;
}

/// Runs schemathesis in `mode` (positive: requests the document allows; negative: each breaks
/// it somewhere) with `schema` against the server; fails with its report when it finds a fault.
fn schemathesis_run(st: &Path, s: &Server, schema: &Path, mode: &str) {
    let mut cmd = Command::new(st);
    cmd.current_dir(schema.parent().expect("a folder"))
        .env("NO_COLOR", "1")
        .arg("run")
        .arg(schema)
        .args(["--url", &s.base, "--mode", mode])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance,\
             negative_data_rejection,unsupported_method",
        ])
        .args(["--max-examples", "30", "--seed", "16"])
        .args(["--request-timeout", "20"]);
    let out = cmd.output().expect("run schemathesis");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis ({mode}) found faults:\n{text}\n--- end of the server log ---\n{}",
        tail(&s.log_text())
    );
    let tested = format!("Tested: {}", ROUTES.len());
    assert!(
        text.contains(&tested),
        "every served operation ran:\n{text}"
    );
}

/// Schemathesis generates requests from the served document, hostile ones included, and checks
/// each answer: no 5xx, a documented status, content type, headers and body.
#[test]
fn schemathesis_finds_nothing_wrong() {
    let st = schemathesis();
    let dir = tempfile::tempdir().expect("tempdir");
    // Tasks point at closed loopback ports (the document's example) or are refused; EXEC from
    // the network stays disabled (no --exec_dir).
    let s = Server::builder(&dir)
        .args(&["--token", TOKEN, "--task_timeout", "1", "--max_retry", "0"])
        .start();
    let served = served_document(&s);

    // Requests that break the document: the server refuses every one, so none waits.
    let schema = dir.path().join("openapi.json");
    std::fs::write(&schema, served.to_string()).expect("write the schema");
    schemathesis_run(&st, &s, &schema, "negative");

    // Requests it allows, except that none may block more than a second: a `wait` submit and a
    // long poll (60 s without `timeout`) last until the task finishes, which a delayed or
    // retrying task does not do soon.
    let mut fast = served;
    let wait = "/components/schemas/Task/properties/wait/maximum";
    set(&mut fast, wait, 1.into());
    let timeout = "/paths/~1task_resp~1{id}/get/parameters/1";
    set(&mut fast, &format!("{timeout}/schema/maximum"), 1.into());
    fast.pointer_mut(timeout)
        .and_then(Value::as_object_mut)
        .expect("the timeout parameter")
        .insert("required".to_string(), true.into());
    let schema = dir.path().join("openapi-fast.json");
    std::fs::write(&schema, fast.to_string()).expect("write the schema");
    schemathesis_run(&st, &s, &schema, "positive");
}

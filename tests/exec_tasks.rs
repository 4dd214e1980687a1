//! EXEC tasks under `--exec_dir`: output captured, non-zero exit fails, a timeout kills the whole
//! process group, and names that could leave the directory are refused.

mod common;
use common::{eventually, Server};
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

fn script(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn exec_server(dir: &tempfile::TempDir) -> (Server, std::path::PathBuf) {
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let bin_s = bin.to_string_lossy().into_owned();
    let s = Server::builder(dir).args(&["--exec_dir", &bin_s]).start();
    (s, bin)
}

#[test]
fn exec_success_and_failure_report_output_and_exit_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, bin) = exec_server(&dir);
    script(&bin, "hello", r#"echo "out:$1:$2"; echo "err-line" >&2"#);
    script(
        &bin,
        "boom",
        r#"echo "about to fail"; echo "bad thing" >&2; exit 3"#,
    );

    let (code, r) = s.submit(&json!({"id":"e-ok","method":"EXEC","name":"hello",
                                      "params":["a b","c"],"wait":10}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"], "OK", "{r}");
    assert_eq!(r["code"], 0, "{r}");
    let out = r["output"].as_str().unwrap_or("");
    assert!(
        out.contains("out:a b:c"),
        "arguments reach the program unsplit: {r}"
    );
    assert!(out.contains("err-line"), "stderr is captured too: {r}");

    let (code, r) = s.submit(&json!({"id":"e-bad","method":"EXEC","name":"boom",
                                      "max_retry":0,"wait":10}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"], "Fail", "{r}");
    assert_eq!(r["status"], "dead", "{r}");
    assert_eq!(r["code"], 3, "{r}");
    assert!(
        r["output"].as_str().unwrap_or("").contains("bad thing"),
        "{r}"
    );
}

#[test]
fn a_timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, bin) = exec_server(&dir);
    let pidfile = dir.path().join("child.pid");
    script(
        &bin,
        "hang",
        &format!("sleep 300 &\necho $! > {}\nwait", pidfile.display()),
    );
    let (code, r) = s.submit(&json!({"id":"e-hang","method":"EXEC","name":"hang",
                                      "timeout":1,"max_retry":0,"wait":20}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"], "Fail", "{r}");
    assert!(
        r["reason"].as_str().unwrap_or("").contains("timed out")
            || r["reason"].as_str().unwrap_or("").contains("timeout"),
        "{r}"
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("the script wrote its child's pid")
        .trim()
        .parse()
        .expect("a pid");
    // The background `sleep 300` was in the task's process group: it must be gone.
    eventually(
        Duration::from_secs(5),
        "the child process to be gone",
        || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Gone, or a zombie waiting for its (reparented) parent.
            (stat.is_empty() || stat.contains(") Z ")).then_some(())
        },
    );
}

#[test]
fn names_that_leave_the_exec_dir_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, bin) = exec_server(&dir);
    script(&bin, "ok", "true");
    for name in ["../ok", "/bin/sh", "sub/ok", ".."] {
        let (code, r) = s.submit(&json!({"method":"EXEC","name":name}));
        assert_eq!(code, 400, "{name}: {r}");
        assert!(
            r["reason"].as_str().unwrap_or("").contains("name"),
            "{name}: {r}"
        );
    }
}

#[test]
fn exec_from_the_network_is_off_without_exec_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).start();
    let (code, r) = s.submit(&json!({"method":"EXEC","name":"true"}));
    assert_eq!(code, 400, "{r}");
    assert!(r["reason"].as_str().unwrap_or("").contains("exec"), "{r}");
}

/// The program's real path (links resolved) must lie inside `--exec_dir`: a link to /bin/sh or
/// to a script elsewhere is refused at submit with the reason, a link to a program inside the
/// directory runs, and a link changed between submit and run is refused when it runs.
#[test]
fn symlinks_cannot_lead_out_of_the_exec_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, bin) = exec_server(&dir);
    script(&bin, "inside", "echo inside-ran");
    script(dir.path(), "outside.sh", "echo outside-ran");
    let link = |name: &str, to: &Path| {
        let _ = std::fs::remove_file(bin.join(name));
        std::os::unix::fs::symlink(to, bin.join(name)).expect("symlink");
    };
    link("shlink", Path::new("/bin/sh"));
    link("outlink", &dir.path().join("outside.sh"));
    link("inlink", Path::new("inside"));
    link("swap", &bin.join("inside"));

    for name in ["shlink", "outlink"] {
        let (code, r) = s.submit(&json!({"method":"EXEC","name":name,"params":"-c true"}));
        assert_eq!(code, 400, "{name}: {r}");
        let reason = r["reason"].as_str().unwrap_or("");
        assert!(reason.contains("outside the exec directory"), "{name}: {r}");
    }

    let (code, r) = s.submit(&json!({"method":"EXEC","name":"inlink","wait":10}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"], "OK", "{r}");
    assert!(
        r["output"].as_str().unwrap_or("").contains("inside-ran"),
        "{r}"
    );

    let (code, r) = s.submit(&json!({"method":"EXEC","name":"bad\u{0}name"}));
    assert_eq!(code, 400, "{r}");
    let reason = r["reason"].as_str().unwrap_or("");
    assert!(reason.contains("NUL"), "{r}");
    assert!(!reason.contains("'/'"), "NUL has its own message: {r}");

    let (code, r) = s.submit(&json!({"method":"EXEC","name":"missing"}));
    assert_eq!(code, 400, "{r}");
    assert!(
        r["reason"].as_str().unwrap_or("").contains("not found"),
        "{r}"
    );

    // Accepted while the link points inside; re-pointed at /bin/sh before it runs.
    let (code, r) = s.submit(&json!({"id":"swapped","method":"EXEC","name":"swap",
                                      "delay":2,"max_retry":0}));
    assert_eq!(code, 200, "{r}");
    link("swap", Path::new("/bin/sh"));
    let (code, r) = s.get("/task_resp/swapped?timeout=20");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["result"], "Fail", "the re-pointed link must not run: {r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("outside the exec directory"),
        "{r}"
    );
}

/// `--exec_any` lets the network run any program found on PATH, with no `--exec_dir`.
#[test]
fn exec_any_runs_any_program_on_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--exec_any"]).start();
    let (code, r) = s.submit(&json!({"id":"any-echo","method":"EXEC","name":"echo",
                                      "params":"hi","wait":10}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["code"], 0, "{r}");
    assert_eq!(r["output"], "hi\n", "{r}");
}

/// Output beyond 64 KiB is cut: the first 65536 bytes are kept, followed by the marker, and
/// nothing else.
#[test]
fn output_beyond_64_kib_is_cut_and_marked() {
    const MARKER: &str = "[output cut at 65536 bytes]";
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--exec_any"]).start();
    let full: String = (1..=30000).map(|i| format!("{i}\n")).collect();
    assert!(full.len() > 65536, "the program writes more than 64 KiB");
    let (code, r) = s.submit(&json!({"id":"long-out","method":"EXEC","name":"seq",
                                      "params":"1 30000","wait":20}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], "succeeded", "{r}");
    let out = r["output"].as_str().expect("output");
    assert!(
        out.starts_with(&full[..65536]),
        "the first 65536 bytes are kept as they were: {} bytes kept, starting {:?}",
        out.len(),
        &out[..out.len().min(40)]
    );
    assert!(
        out.ends_with(MARKER),
        "marked at its end: ...{:?}",
        &out[out.len().saturating_sub(60)..]
    );
    assert!(
        out.len() <= 65536 + 1 + MARKER.len(),
        "at most 64 KiB plus the marker line: {} bytes",
        out.len()
    );
    // The stored result is the same.
    let (code, stored) = s.get("/task_resp/long-out?timeout=0");
    assert_eq!(code, 200, "{stored}");
    assert_eq!(stored["output"], r["output"]);
}

/// The nice value in a `/proc/.../stat` line (its 19th field).
fn nice_in_stat(stat: &str) -> i64 {
    common::stat_field(stat, 19).parse().expect("nice field")
}

/// Workers run 5 nice steps below the server's other threads, so that under full load the
/// intake, the store writer and the outcome stage get the CPU first; a program an EXEC task
/// starts runs at the server's own priority, not the workers'.
#[test]
fn workers_yield_the_cpu_but_their_programs_do_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--exec_any"]).start();
    let (main, workers) = nices(s.pid().expect("pid"));
    assert!(
        workers.iter().all(|&n| n == (main + 5).min(19)),
        "worker nice values {workers:?}, server {main}"
    );
    let (code, r) = s.submit(&json!({"id":"nice","method":"EXEC","name":"sh",
        "params":["-c","cat /proc/$$/stat"],"wait":10}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], "succeeded", "{r}");
    let program = nice_in_stat(r["output"].as_str().expect("output"));
    assert_eq!(
        program, main,
        "the program runs at the server's priority: {r}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::builder(&dir).args(&["--worker_nice", "0"]).start();
    let (main, workers) = nices(s.pid().expect("pid"));
    assert!(
        workers.iter().all(|&n| n == main),
        "--worker_nice 0: worker nice values {workers:?}, server {main}"
    );
}

/// The nice values of a server's main thread and of its workers.
fn nices(pid: u32) -> (i64, Vec<i64>) {
    let mut workers = Vec::new();
    let mut main = None;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let t = t.expect("task").path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(t.join("stat")).unwrap_or_default();
        if stat.is_empty() {
            continue;
        }
        if comm.starts_with("worker-") {
            workers.push(nice_in_stat(&stat));
        } else if t.file_name() == Some(std::ffi::OsStr::new(&pid.to_string())) {
            main = Some(nice_in_stat(&stat));
        }
    }
    let main = main.expect("the main thread");
    assert!(!workers.is_empty(), "no worker thread found");
    (main, workers)
}

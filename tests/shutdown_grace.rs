//! The graceful-stop bound: after SIGTERM a running attempt gets up to 30 s to finish; one that
//! takes longer does not hold the process, which exits 0 and keeps the task in the store, and
//! the task runs again at the next start. This test takes about 30 s (the bound itself).

mod common;
use common::{eventually, Server};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// Process ids written by each run of the task's script, one line per run.
fn runs(file: &Path) -> Vec<i32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills the `sleep`s the task left (poulpe does not end an attempt still running when it
/// stops, nor when it is killed), even when the test fails.
struct Reaper<'a>(&'a Path);

impl Drop for Reaper<'_> {
    fn drop(&mut self) {
        for pid in runs(self.0) {
            // SAFETY: kill(2) of a process group this test's task made (its script's pid).
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

#[test]
fn sigterm_waits_at_most_30_s_for_a_long_attempt_which_runs_again_at_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marks = dir.path().join("runs");
    let marks_s = marks.to_str().expect("UTF-8 path");
    let mut s = Server::builder(&dir).args(&["--exec_any"]).start();
    let _reaper = Reaper(&marks);
    let script = format!("echo $$ >> {marks_s}; exec sleep 100");
    let (code, r) = s.submit(&json!({"id":"long-run","method":"EXEC","name":"sh",
        "params":["-c", script],"timeout":300,"max_retry":0}));
    assert_eq!(code, 200, "{r}");
    eventually(Duration::from_secs(10), "the attempt to start", || {
        let (_, r) = s.get("/task_resp/long-run?timeout=0");
        (runs(&marks).len() == 1 && r["status"] == "running").then_some(())
    });

    let signalled = Instant::now();
    s.signal(libc::SIGTERM);
    let status = s
        .wait_exit(Duration::from_secs(60))
        .expect("the server exits after the 30 s grace, though the attempt goes on");
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0: {status:?}");
    assert!(
        took >= Duration::from_secs(30),
        "the running attempt was given its 30 s: the server exited after {took:?}"
    );
    assert!(
        s.log_text().contains("still running at the deadline"),
        "{}",
        s.log_text()
    );

    // The attempt did not finish: the task is still in the store, and runs again.
    let s2 = Server::builder(&dir).args(&["--exec_any"]).start();
    eventually(Duration::from_secs(20), "the task to run again", || {
        (runs(&marks).len() == 2).then_some(())
    });
    let (code, r) = s2.get("/task_resp/long-run?timeout=0");
    assert_eq!(code, 202, "{r}");
    assert_eq!(r["status"], "running", "{r}");
    eprintln!("exited {took:?} after SIGTERM");
}

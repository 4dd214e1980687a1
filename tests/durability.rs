//! Durability observed from outside: the real binary runs under `strace -f`, and the trace must
//! show the store's write made durable (written through a descriptor opened with `O_DSYNC`, or
//! followed by an fsync/fdatasync) before a submit's `200` is written to the client, and a dead-letter record written the atomic way (fsync of the temporary file, rename,
//! fsync of the folder) before the task is reported dead (README: "Retries and dead letters",
//! "acknowledged only once durable"). A `kill -9` keeps the page cache, so no crash test can see
//! a missing sync; the trace can.
//!
//! Needs `strace` (scripts/test.sh installs it); without it these tests fail, they do not skip.

mod common;
use common::{binary, free_port, try_get, try_post_json};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// poulpe started under `strace -f`, writing its trace to `trace`.
struct Traced {
    strace: Option<Child>,
    /// poulpe's own pid (strace's child).
    pid: Option<i32>,
    port: u16,
    trace: PathBuf,
    log: PathBuf,
}

const CALLS: &str = "trace=fdatasync,fsync,write,pwrite64,sendto,writev,read,recvfrom,rename,\
                     renameat,renameat2,open,openat";

impl Traced {
    fn start(dir: &Path, args: &[&str]) -> Traced {
        let have = Command::new("strace")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            have,
            "strace is needed to observe fsync: run scripts/test.sh, which installs it \
             (apt-get install strace)"
        );
        let data = dir.join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let port = free_port();
        let trace = dir.join("trace");
        let log = dir.join("poulpe.log");
        let child = Command::new("strace")
            .args(["-f", "-y", "-s", "4096", "-ttt", "-e", CALLS, "-o"])
            .arg(&trace)
            .arg("--")
            .arg(binary())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--data"])
            .arg(&data)
            .args(args)
            .env("POULPE_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn strace");
        let mut t = Traced {
            strace: Some(child),
            pid: None,
            port,
            trace,
            log,
        };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = try_get(&t.url("/health")) {
                break;
            }
            if let Some(Ok(Some(st))) = t.strace.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "strace or poulpe exited at start ({st}); ptrace may be forbidden here:\n{}",
                    std::fs::read_to_string(&t.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < end,
                "poulpe under strace did not come up:\n{}",
                std::fs::read_to_string(&t.log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(50));
        }
        let spid = t.strace.as_ref().expect("running").id();
        let children = std::fs::read_to_string(format!("/proc/{spid}/task/{spid}/children"))
            .expect("strace's children");
        t.pid = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok());
        assert!(t.pid.is_some(), "poulpe's pid under strace: {children:?}");
        t
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// Stops poulpe (kill -9) and strace, and gives back the trace.
    fn finish(&mut self) -> String {
        if let Some(pid) = self.pid.take() {
            // SAFETY: kill(2) on poulpe's pid, a child of our strace child, still traced.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        if let Some(mut c) = self.strace.take() {
            let end = Instant::now() + Duration::from_secs(10);
            while !matches!(c.try_wait(), Ok(Some(_))) && Instant::now() < end {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        std::fs::read_to_string(&self.trace).expect("read the strace output")
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// One system call from the trace: where it started and where it returned (line numbers in the
/// trace, which strace writes in the order things happened), its name, its text and its result.
#[derive(Debug)]
struct Call {
    start: usize,
    end: usize,
    name: String,
    text: String,
    ret: String,
}

/// Parses `strace -f -ttt` output: `PID TIME name(args) = ret`, joining `<unfinished ...>` with
/// its `<... name resumed>` line of the same pid.
fn parse(trace: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut pending: std::collections::HashMap<String, (usize, String)> = Default::default();
    for (i, line) in trace.lines().enumerate() {
        // The pid is padded to a width: `123  1.5 call(...)`.
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let Some((_time, rest)) = rest.trim_start().split_once(' ') else {
            continue;
        };
        if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(pid.to_string(), (i, head.to_string()));
            continue;
        }
        let (start, text) = if rest.starts_with("<... ") {
            let Some((s, head)) = pending.remove(pid) else {
                continue;
            };
            let tail = rest.split_once(" resumed>").map(|x| x.1).unwrap_or("");
            (s, format!("{head}{tail}"))
        } else {
            (i, rest.to_string())
        };
        let Some(open) = text.find('(') else { continue };
        let name = text[..open].to_string();
        if name.starts_with('+') || name.starts_with('-') {
            continue; // signals and exits
        }
        let ret = text
            .rsplit_once(") = ")
            .map(|x| x.1.trim().to_string())
            .unwrap_or_default();
        calls.push(Call {
            start,
            end: i,
            name,
            text,
            ret,
        });
    }
    calls
}

fn is_sync(c: &Call) -> bool {
    c.name == "fsync" || c.name == "fdatasync"
}

fn is_send(c: &Call) -> bool {
    matches!(c.name.as_str(), "write" | "sendto" | "writev")
}

fn is_recv(c: &Call) -> bool {
    matches!(c.name.as_str(), "read" | "recvfrom")
}

/// The request that carried `id` and the `HTTP/1.1 200` answer written after it (whose text
/// contains `answer_has`).
fn request_and_answer<'a>(calls: &'a [Call], id: &str, answer_has: &str) -> (&'a Call, &'a Call) {
    let needle = format!("\\\"id\\\":\\\"{id}\\\"");
    let req = calls
        .iter()
        .find(|c| is_recv(c) && c.text.contains(&needle))
        .unwrap_or_else(|| panic!("no read of the request for {id} in the trace"));
    let answer = calls
        .iter()
        .find(|c| {
            is_send(c)
                && c.start > req.end
                && c.text.contains("HTTP/1.1 200")
                && c.text.contains(answer_has)
        })
        .unwrap_or_else(|| panic!("no `HTTP/1.1 200` answer for {id} in the trace"));
    (req, answer)
}

fn show(calls: &[Call], from: usize, to: usize) -> String {
    calls
        .iter()
        .filter(|c| {
            c.start >= from && c.start <= to && !is_recv(c) && !c.text.starts_with("write(2<")
        })
        .map(|c| {
            let t: String = c.text.chars().take(160).collect();
            format!("  [{}..{}] {t}", c.start, c.end)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_submit_is_fsynced_before_its_200_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = Traced::start(dir.path(), &[]);
    // Delayed, so the only store writes after the request are the submit's own.
    let (code, body) = try_post_json(
        &s.url("/task_in_queue"),
        &json!({"id":"dur-1","method":"GET","name":"http://127.0.0.1:9/","delay":600}),
    )
    .expect("submit");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["result"], "OK", "{body}");
    let trace = s.finish();
    let calls = parse(&trace);
    let (req, answer) = request_and_answer(&calls, "dur-1", "HTTP/1.1 200");
    // The store's journal: the task is written there, then synced, then acknowledged.
    let journal = Path::new("data").join("poulpe.journal");
    let journal = journal.to_str().expect("utf8");
    let written = calls.iter().find(|c| {
        c.name.starts_with("pwrite")
            && c.text.contains(journal)
            && c.text.contains("dur-1")
            && c.start > req.end
            && c.end < answer.start
    });
    let written = written.unwrap_or_else(|| {
        panic!(
            "the task was not written to {journal} between reading the submit and writing its \
             200; calls in between:\n{}",
            show(&calls, req.end, answer.start)
        )
    });
    // The journal's name is durable before any record in it: its folder was synced at start.
    let folder_synced = calls
        .iter()
        .any(|c| is_sync(c) && c.text.contains("/data>") && c.ret == "0" && c.end < written.start);
    assert!(
        folder_synced,
        "the data folder was not synced before the first journal record was written"
    );
    // Durable by the write itself (a descriptor opened with O_DSYNC or O_SYNC, whose writes
    // return once on disk), or by a sync of the file after it.
    let fd = written.text[written.text.find('(').unwrap_or(0) + 1..]
        .split('<')
        .next()
        .unwrap_or_default();
    let synchronous = written.ret.parse::<u64>().is_ok()
        && calls.iter().any(|c| {
            // musl's `open` is the `open` system call on x86_64; glibc's is `openat`.
            (c.name == "open" || c.name == "openat")
                && c.text.contains(journal)
                && (c.text.contains("O_DSYNC") || c.text.contains("O_SYNC"))
                && c.ret.split('<').next() == Some(fd)
                && c.end < written.start
        });
    let synced = calls.iter().any(|c| {
        is_sync(c)
            && c.text.contains(journal)
            && c.ret == "0"
            && c.start > written.end
            && c.end < answer.start
    });
    assert!(
        synchronous || synced,
        "the task's write to {journal} was neither synchronous (a descriptor opened with \
         O_DSYNC) nor followed by an fsync/fdatasync of it returning before its 200; calls in \
         between:\n{}",
        show(&calls, req.end, answer.start)
    );
}

#[test]
fn a_dead_letter_record_is_synced_renamed_and_its_folder_synced_before_the_task_is_dead() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = Traced::start(dir.path(), &[]);
    // Nothing listens on port 9: the one attempt fails and the task is dead at once.
    let (code, r) = try_post_json(
        &s.url("/task_in_queue"),
        &json!({"id":"dl-1","method":"GET","name":"http://127.0.0.1:9/","max_retry":0,"wait":20}),
    )
    .expect("submit");
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], "dead", "{r}");
    let trace = s.finish();
    let calls = parse(&trace);
    let (req, answer) = request_and_answer(&calls, "dl-1", "\\\"status\\\":\\\"dead\\\"");
    let in_window = |c: &&Call| c.start > req.end && c.end < answer.start;
    let tmp = ".task-dl-1.json.tmp";
    let sync_tmp = calls
        .iter()
        .filter(in_window)
        .find(|c| is_sync(c) && c.text.contains(tmp) && c.ret == "0");
    let rename = calls.iter().filter(in_window).find(|c| {
        c.name.starts_with("rename") && c.text.contains(tmp) && c.text.contains("/task-dl-1.json")
    });
    let why = || show(&calls, req.end, answer.start);
    let sync_tmp = sync_tmp.unwrap_or_else(|| {
        panic!(
            "no fsync of the temporary file {tmp} before the task was reported dead:\n{}",
            why()
        )
    });
    let rename = rename.unwrap_or_else(|| {
        panic!(
            "no rename of {tmp} to task-dl-1.json before the task was reported dead:\n{}",
            why()
        )
    });
    assert!(
        rename.start > sync_tmp.end,
        "the temporary file was renamed before its fsync returned:\n{}",
        why()
    );
    assert_eq!(rename.ret, "0", "{}", rename.text);
    let folder = rename
        .text
        .split('"')
        .nth(3)
        .and_then(|p| Path::new(p).parent())
        .and_then(|p| p.to_str())
        .expect("the record's folder")
        .to_string();
    let sync_dir = calls.iter().filter(in_window).find(|c| {
        is_sync(c)
            && c.start > rename.end
            && c.text.contains(&format!("<{folder}>"))
            && c.ret == "0"
    });
    assert!(
        sync_dir.is_some(),
        "no fsync of the folder {folder} after the rename and before the task was reported \
         dead:\n{}",
        why()
    );
    let record: Value = serde_json::from_slice(
        &std::fs::read(Path::new(&folder).join("task-dl-1.json")).expect("the record"),
    )
    .expect("record JSON");
    assert_eq!(record["task"]["id"], "dl-1");
}

//! A full disk is a store outage the embedded store heals from by itself: with `--data` on a
//! small tmpfs that the test fills up, submits get 503 and `/sys_info` says the store is down,
//! no new attempt starts, and once space is back the server carries on without a restart —
//! every acknowledged task runs once, outcomes of attempts that ran during the outage are
//! recorded, and a `kill -9` and restart afterwards runs nothing again.
//!
//! Mounting the tmpfs needs root (CAP_SYS_ADMIN); without it the test fails and says so.

mod common;
use common::{eventually, hits::hit_id, hits::hits_by_id, hits::wait_all_hit, Server, Sink};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A tmpfs mounted for the test; unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("this test needs `mount` (and root): {e}"));
        assert!(
            out.status.success(),
            "this test needs root (CAP_SYS_ADMIN) to mount a {size} tmpfs at {}: mount said {:?}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a process that has not exited yet): detach it now, freed when unused.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Writes a file in `dir` until the filesystem refuses more bytes, then gives back `room`
/// bytes; returns its path.
fn fill_up(dir: &Path, room: u64) -> PathBuf {
    let path = dir.join("filler");
    let mut f = File::create(&path).expect("filler file");
    for chunk in [64 * 1024, 4096, 512, 1] {
        let buf = vec![0xA5u8; chunk];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    let len = f.metadata().expect("filler size").len();
    f.set_len(len.saturating_sub(room))
        .expect("filler truncate");
    path
}

fn get_task(sink: &Sink, id: &str) -> Value {
    json!({"id": id, "method": "GET", "name": sink.url("/ok"), "params": format!("id={id}")})
}

fn store_up(s: &Server) -> Option<bool> {
    let (code, info) = s.get("/sys_info");
    assert_eq!(code, 200, "{info}");
    info["store"]["up"].as_bool()
}

/// Fill tasks whose hits reached the sink.
fn fill_hits(sink: &Sink) -> usize {
    sink.hits()
        .iter()
        .filter(|h| hit_id(h).is_some_and(|id| id.starts_with("fill-")))
        .count()
}

#[test]
fn a_full_disk_is_an_outage_the_embedded_store_heals_from() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("small");
    let fs = Tmpfs::mount(&mnt, "8m");
    let logs = dir.path().join("logs");
    let dead = dir.path().join("dead");
    let dead_arg = dead.to_string_lossy().into_owned();
    let args = ["--workers", "4", "--dead", &dead_arg];
    let sink = Sink::start();
    let mut s = Server::builder(&fs.path).log_dir(&logs).args(&args).start();
    let mut want: HashSet<String> = HashSet::new();

    // Before the outage: tasks run and their results are stored.
    for i in 0..5 {
        let id = format!("before-{i}");
        assert_eq!(s.submit(&get_task(&sink, &id)).0, 200);
        want.insert(id);
    }
    wait_all_hit(&sink, &want, Duration::from_secs(20), "before the outage");
    // Two attempts that are still running when the disk fills up.
    let mut running = Vec::new();
    for i in 0..2 {
        let id = format!("running-{i}");
        let t = json!({"id": id, "method": "GET", "name": sink.url("/slow"),
                       "params": format!("ms=3000&id={id}")});
        assert_eq!(s.submit(&t).0, 200);
        want.insert(id.clone());
        running.push(id);
    }
    let running_set: HashSet<String> = running.iter().cloned().collect();
    wait_all_hit(
        &sink,
        &running_set,
        Duration::from_secs(20),
        "slow tasks started",
    );

    // The disk fills up. Tasks with big bodies, due a few seconds from now, are submitted until
    // the store cannot take one more; every acknowledged one must still run later.
    let filler = fill_up(&fs.path, 512 * 1024);
    let body = json!({"pad": "x".repeat(16 * 1024)}).to_string();
    let mut refused = None;
    for i in 0..5000 {
        let id = format!("fill-{i}");
        let t = json!({"id": id, "method": "POST", "name": sink.url(&format!("/fill?id={id}")),
                       "params": body, "delay": 5});
        let (code, r) = s.submit(&t);
        match code {
            200 => {
                want.insert(id);
            }
            503 => {
                refused = Some((id, r));
                break;
            }
            other => panic!("submit {id}: unexpected {other}: {r}"),
        }
    }
    let (refused_id, r) = refused.expect("a submit refused with 503 once the disk is full");
    let filled = want.iter().filter(|id| id.starts_with("fill-")).count();
    assert!(filled > 0, "some tasks fit in the room left: {refused_id}");
    assert_eq!(r["result"], "Fail", "{r}");
    assert!(
        !r["reason"].as_str().unwrap_or("").is_empty(),
        "a 503 says why: {r}"
    );

    // The outage is visible, and lasts while the disk stays full.
    eventually(
        Duration::from_secs(10),
        "store.up false in /sys_info while the disk is full",
        || (store_up(&s) == Some(false)).then_some(()),
    );
    let fill_hits_at_outage = fill_hits(&sink);
    let (code, r) = s.submit(&get_task(&sink, "while-full"));
    assert_eq!(code, 503, "a submit while the disk is full: {r}");
    assert_eq!(s.get("/health").0, 200, "the HTTP side keeps serving");

    // The slow attempts finish during the outage; their outcomes wait in memory. The fill tasks
    // come due, but the timer holds them back: no attempt starts whose outcome could not be
    // recorded.
    eventually(
        Duration::from_secs(30),
        "the slow attempts to end while the disk is full",
        || {
            let (_, info) = s.get("/sys_info");
            info["workers"]
                .as_array()
                .is_some_and(|w| w.iter().all(|w| w["running"] == 0))
                .then_some(())
        },
    );
    let (_, info) = s.get("/sys_info");
    assert_eq!(
        info["working_total"].as_u64(),
        Some(running.len() as u64),
        "their outcomes are not recorded yet, so the store still has them running: {info}"
    );
    eventually(
        Duration::from_secs(30),
        "the timer holding back due fill tasks (its log line) while the disk is full",
        || {
            s.log_text()
                .contains("cannot load due task fill-")
                .then_some(())
        },
    );
    assert_eq!(
        store_up(&s),
        Some(false),
        "still down while the disk is full"
    );
    assert_eq!(
        fill_hits(&sink),
        fill_hits_at_outage,
        "no attempt starts while the store cannot record its outcome"
    );
    assert_eq!(
        s.submit(&get_task(&sink, "still-full")).0,
        503,
        "submits are still refused"
    );

    // Space comes back: the store heals by itself, without a restart.
    std::fs::remove_file(&filler).expect("remove the filler");
    eventually(Duration::from_secs(30), "a submit accepted again", || {
        (s.submit(&get_task(&sink, "after")).0 == 200).then_some(())
    });
    want.insert("after".into());
    eventually(Duration::from_secs(10), "store.up true again", || {
        (store_up(&s) == Some(true)).then_some(())
    });
    wait_all_hit(&sink, &want, Duration::from_secs(60), "after the outage");
    for id in &want {
        let (code, r) = s.get(&format!("/task_resp/{id}?timeout=30"));
        assert_eq!(code, 200, "{id}: {r}");
        assert_eq!(r["status"], "succeeded", "{id}: {r}");
    }
    let ran_once = |what: &str| {
        let seen = hits_by_id(&sink.hits());
        for id in &want {
            let n = seen.get(id).map_or(0, Vec::len);
            assert_eq!(n, 1, "{what}: {id} ran {n} times");
        }
        for id in [&refused_id, "while-full", "still-full"] {
            assert!(
                !seen.contains_key(id),
                "{what}: {id} was refused with 503 and must not run"
            );
        }
    };
    ran_once("after healing");

    // A crash now: nothing that finished runs again, every result is still there.
    s.kill9();
    let s = Server::builder(&fs.path).log_dir(&logs).args(&args).start();
    assert_eq!(s.submit(&get_task(&sink, "marker")).0, 200);
    let (code, r) = s.get("/task_resp/marker?timeout=30");
    assert_eq!(code, 200, "marker: {r}");
    let (_, info) = s.get("/sys_info");
    for k in ["working_total", "delaying_total", "queued_total"] {
        assert_eq!(
            info[k].as_u64(),
            Some(0),
            "nothing unfinished after the restart: {info}"
        );
    }
    ran_once("after a restart");
    for id in &running {
        let (code, r) = s.get(&format!("/task_resp/{id}?timeout=0"));
        assert_eq!(code, 200, "{id}: {r}");
        assert_eq!(r["status"], "succeeded", "{id}: {r}");
    }
    drop(s);
    drop(fs);
}

//! EXEC attempts: the program runs directly (never through a shell) in its own process group;
//! on timeout the whole group is killed.

use super::{into_text, RunResult, MAX_OUTPUT};
use crate::handoff::Handoff;
use crate::task::{resolve_in_dir, ExecPolicy, ProgramError, Task};
use crossbeam_channel::{bounded, Receiver};
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Which file runs for this task under the EXEC rules, and the `argv[0]` it is given.
fn program(task: &Task, policy: &ExecPolicy) -> Result<(PathBuf, PathBuf), ProgramError> {
    if task.trusted {
        let p = PathBuf::from(&task.name);
        return Ok((p.clone(), p));
    }
    match policy {
        ExecPolicy::Any => {
            let p = PathBuf::from(&task.name);
            Ok((p.clone(), p))
        }
        // The resolved path runs, so a link re-pointed after this check changes nothing;
        // argv[0] stays the name as written (some programs look at it).
        ExecPolicy::Dir(dir) => {
            resolve_in_dir(dir, &task.name).map(|real| (real, dir.join(&task.name)))
        }
        ExecPolicy::Disabled => Err(ProgramError::Disabled),
    }
}

/// A program to start, and where its `Child` goes.
struct SpawnJob {
    cmd: Command,
    child: Arc<Handoff<std::io::Result<Child>>>,
}

/// Starts EXEC programs from one thread that keeps the server's own CPU priority: workers run
/// at a lower one (`--worker_nice`), which a program started by a worker would inherit and
/// could not give back (raising priority needs privileges). The thread lives as long as the
/// executors: `PR_SET_PDEATHSIG` fires when the thread that started a program ends, not the
/// process, so its programs are killed only once the server is done with them.
pub(crate) struct Spawner {
    jobs: Option<Arc<Handoff<SpawnJob>>>,
}

impl Spawner {
    /// Starts the `exec-spawn` thread; call it from a thread at the normal priority (it is
    /// inherited). Without the thread, programs start on the worker's own thread.
    pub(crate) fn start() -> Spawner {
        let jobs: Arc<Handoff<SpawnJob>> = Arc::new(Handoff::new(64));
        let queue = jobs.clone();
        let started = thread::Builder::new()
            .name("exec-spawn".into())
            .spawn(move || {
                while let Some(mut job) = queue.pop() {
                    // Always answered, so no worker waits forever.
                    let spawned =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.cmd.spawn()))
                            .unwrap_or_else(|_| Err(std::io::Error::other("starting it panicked")));
                    let _ = job.child.push(spawned);
                }
            });
        match started {
            Ok(_) => Spawner { jobs: Some(jobs) },
            Err(e) => {
                log::warn!("exec: cannot start the exec-spawn thread ({e}); programs inherit the workers' lower CPU priority");
                Spawner { jobs: None }
            }
        }
    }

    /// Starts `cmd`.
    fn spawn(&self, mut cmd: Command) -> std::io::Result<Child> {
        let Some(jobs) = &self.jobs else {
            return cmd.spawn();
        };
        let child = Arc::new(Handoff::new(1));
        match jobs.push(SpawnJob {
            cmd,
            child: child.clone(),
        }) {
            Ok(()) => child
                .pop()
                .unwrap_or_else(|| Err(std::io::Error::other("the exec-spawn thread has stopped"))),
            Err(mut job) => job.cmd.spawn(),
        }
    }
}

impl Drop for Spawner {
    /// Ends the `exec-spawn` thread.
    fn drop(&mut self) {
        if let Some(jobs) = &self.jobs {
            jobs.close();
        }
    }
}

/// Reads a pipe to its end, keeping at most `MAX_OUTPUT` bytes; says whether it cut.
fn drain(mut r: impl Read + Send + 'static) -> Receiver<(Vec<u8>, bool)> {
    let (tx, rx) = bounded(1);
    let spawned = thread::Builder::new()
        .name("exec-pipe".into())
        .spawn(move || {
            let mut kept = Vec::new();
            let mut cut = false;
            let mut buf = [0u8; 8192];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let room = MAX_OUTPUT.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                        cut |= n > room;
                    }
                }
            }
            let _ = tx.send((kept, cut));
        });
    if let Err(e) = spawned {
        log::error!("exec: cannot start a pipe reader: {e}");
    }
    rx
}

/// Process groups of the programs running now, so that shutdown can end what outlived the grace.
static RUNNING: parking_lot::Mutex<Vec<u32>> = parking_lot::Mutex::new(Vec::new());

/// Keeps a process group in [`RUNNING`] while its program runs.
struct Registered(u32);

impl Registered {
    fn new(pgid: u32) -> Registered {
        RUNNING.lock().push(pgid);
        Registered(pgid)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        RUNNING.lock().retain(|&g| g != self.0);
    }
}

/// Kills the process groups of every program still running (at the end of a shutdown whose
/// grace ran out: their tasks run again at the next start). Returns how many.
pub(crate) fn kill_running() -> usize {
    let groups = RUNNING.lock().clone();
    for &g in &groups {
        kill_group(g);
    }
    groups.len()
}

fn kill_group(pgid: u32) {
    // SAFETY: kill(2) with a negative pid signals the process group we created; no memory is
    // touched.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), libc::SIGKILL);
    }
}

/// One EXEC attempt: exit code 0 is success; stdout then stderr is the output.
pub(crate) fn run(
    task: &Task,
    policy: &ExecPolicy,
    spawner: &Spawner,
    timeout: Duration,
) -> RunResult {
    let (path, arg0) = match program(task, policy) {
        Ok(p) => p,
        Err(e) => {
            return RunResult {
                permanent: true,
                ..RunResult::failed(e.to_string())
            }
        }
    };
    let mut cmd = Command::new(&path);
    cmd.arg0(&arg0)
        .args(&task.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent. The program
    // gets SIGKILL if poulpe dies (kill -9) instead of running on as an orphan while its task
    // runs again after the restart.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = match spawner.spawn(cmd) {
        Ok(c) => c,
        Err(e) => return RunResult::failed(format!("cannot start {}: {e}", path.display())),
    };
    let pgid = child.id();
    let _registered = Registered::new(pgid);
    let deadline = Instant::now() + timeout;
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let collect = |rx: Option<Receiver<(Vec<u8>, bool)>>| -> Option<(Vec<u8>, bool)> {
        match rx {
            None => Some((Vec::new(), false)),
            Some(rx) => rx.recv_deadline(deadline).ok(),
        }
    };
    // The pipes close when the program (and anything it started) exits, or at the deadline.
    let stdout = collect(out);
    let stderr = collect(err);
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                timed_out = true;
                kill_group(pgid);
                break child.wait().ok();
            }
            Err(e) => {
                kill_group(pgid);
                let _ = child.wait();
                return RunResult::failed(format!("waiting for {} failed: {e}", path.display()));
            }
        }
    };
    if stdout.is_none() || stderr.is_none() {
        // Something in the group still holds the pipes past the deadline: end it.
        kill_group(pgid);
        timed_out = timed_out || status.is_none();
    }
    let (mut bytes, mut cut) = stdout.unwrap_or_default();
    if let Some((e, c)) = stderr {
        if !e.is_empty() {
            if !bytes.is_empty() && !bytes.ends_with(b"\n") {
                bytes.push(b'\n');
            }
            bytes.extend_from_slice(&e);
        }
        cut |= c;
    }
    if bytes.len() > MAX_OUTPUT {
        bytes.truncate(MAX_OUTPUT);
        cut = true;
    }
    let output = into_text(bytes, MAX_OUTPUT, cut);
    let code = status.and_then(|s| s.code()).map(i64::from);
    let (ok, error) = if timed_out {
        (
            false,
            format!(
                "timed out after {} s; process group killed",
                timeout.as_secs()
            ),
        )
    } else {
        match (code, status.and_then(|s| s.signal())) {
            (Some(0), _) => (true, String::new()),
            (Some(c), _) => (false, format!("exit code {c}")),
            (None, Some(sig)) => (false, format!("killed by signal {sig}")),
            (None, None) => (false, "no exit status".to_string()),
        }
    };
    RunResult {
        ok,
        code,
        output,
        error,
        permanent: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::task;
    use crate::task::{Method, State};

    fn exec(name: &str, args: &[&str]) -> Task {
        let mut t = task("x", State::Ready, 0);
        t.method = Method::Exec;
        t.name = name.to_string();
        t.args = args.iter().map(|s| s.to_string()).collect();
        t
    }

    #[test]
    fn success_failure_and_output() {
        let r = run(
            &exec("echo", &["hello", "world"]),
            &ExecPolicy::Any,
            &Spawner::start(),
            Duration::from_secs(5),
        );
        assert!(r.ok, "{r:?}");
        assert_eq!(r.output, "hello world\n");
        assert_eq!(r.code, Some(0));
        let r = run(
            &exec("sh", &["-c", "echo out; echo err >&2; exit 3"]),
            &ExecPolicy::Any,
            &Spawner::start(),
            Duration::from_secs(5),
        );
        assert!(!r.ok);
        assert_eq!(r.code, Some(3));
        assert_eq!(r.error, "exit code 3");
        assert_eq!(r.output, "out\nerr\n");
        let r = run(
            &exec("no-such-program-xyz", &[]),
            &ExecPolicy::Any,
            &Spawner::start(),
            Duration::from_secs(5),
        );
        assert!(!r.ok && r.error.contains("cannot start"), "{r:?}");
    }

    #[test]
    fn the_real_path_must_stay_in_the_exec_dir() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin");
        std::fs::create_dir(bin.join("sub")).expect("sub");
        std::fs::write(bin.join("job"), "#!/bin/sh\n").expect("job");
        std::fs::write(dir.path().join("elsewhere"), "#!/bin/sh\n").expect("elsewhere");
        symlink("job", bin.join("to-job")).expect("link");
        symlink("/bin/sh", bin.join("to-sh")).expect("link");
        symlink(dir.path().join("elsewhere"), bin.join("to-elsewhere")).expect("link");
        symlink(&bin, bin.join("to-dir")).expect("link");
        symlink("nothing-here", bin.join("dangling")).expect("link");
        let real_bin = bin.canonicalize().expect("canonical");
        let r = |name: &str| resolve_in_dir(&bin, name).map_err(|e| e.to_string());
        assert_eq!(r("job"), Ok(real_bin.join("job")));
        assert_eq!(r("to-job"), Ok(real_bin.join("job")));
        for (name, want) in [
            ("to-sh", "outside the exec directory"),
            ("to-elsewhere", "outside the exec directory"),
            ("to-dir", "outside the exec directory"),
            ("sub", "not a regular file"),
            ("dangling", "not found"),
            ("missing", "not found"),
            ("a\0b", "NUL"),
            ("sub/x", "'/'"),
            ("..", "'..'"),
        ] {
            let got = r(name).expect_err(name);
            assert!(got.contains(want), "{name:?}: {got}");
        }
        // Checked again at run time: a link re-pointed after the submit does not run.
        let res = run(
            &exec("to-sh", &["-c", "echo ran"]),
            &ExecPolicy::Dir(bin.clone()),
            &Spawner::start(),
            Duration::from_secs(5),
        );
        assert!(
            !res.ok && res.permanent && res.error.contains("outside"),
            "{res:?}"
        );
    }

    #[test]
    fn timeout_kills_the_group() {
        let start = Instant::now();
        let r = run(
            &exec("sh", &["-c", "sleep 30 & sleep 30; echo never"]),
            &ExecPolicy::Any,
            &Spawner::start(),
            Duration::from_secs(1),
        );
        assert!(!r.ok);
        assert!(r.error.contains("timed out"), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn output_is_capped() {
        let r = run(
            &exec("head", &["-c", "100000", "/dev/zero"]),
            &ExecPolicy::Any,
            &Spawner::start(),
            Duration::from_secs(5),
        );
        assert!(r.ok);
        assert!(r.output.contains("[output cut at 65536 bytes]"));
    }
}

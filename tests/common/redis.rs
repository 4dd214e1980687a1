//! A private redis-server per test, for the Redis store tests.

use super::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A private redis-server on a free port, stopped (SIGKILL) when dropped.
pub struct RedisServer {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
}

impl RedisServer {
    /// Starts redis-server with no persistence.
    pub fn start(dir: &Path) -> RedisServer {
        RedisServer::start_on(dir, free_port(), &["--save", "", "--appendonly", "no"])
    }

    /// Starts redis-server on `port` with its files in `dir` and extra arguments
    /// (e.g. `["--appendonly", "yes"]` so it can come back with its data).
    pub fn start_on(dir: &Path, port: u16, extra: &[&str]) -> RedisServer {
        std::fs::create_dir_all(dir).expect("redis dir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server is needed ({e}): run scripts/test.sh, which installs it (apt-get install redis-server)")
            });
        let mut r = RedisServer {
            child: Some(child),
            port,
            dir: dir.to_path_buf(),
        };
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < end,
                "redis-server did not start on port {port}"
            );
            if let Some(Ok(Some(st))) = r.child.as_mut().map(|c| c.try_wait()) {
                panic!("redis-server exited at start: {st}");
            }
            thread::sleep(Duration::from_millis(20));
        }
        r
    }

    /// `redis-cli` against this server, for looking at keys as an operator would: its output.
    #[allow(dead_code)]
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli (installed with redis-server by scripts/test.sh)");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops the server (SIGTERM: with appendonly it keeps its data) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

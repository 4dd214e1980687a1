//! The test venv's Python (`scripts/test.sh` makes it) and the small test servers written in it
//! that print `READY <port>` once they listen.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// `POULPE_TEST_PYTHON`, else the test venv's Python; fails, saying how to get it, unless it
/// can `import_check` (`what` names what the tests need).
pub fn python(import_check: &str, what: &str) -> PathBuf {
    let p = std::env::var_os("POULPE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python")
        });
    let ok = Command::new(&p)
        .args(["-c", import_check])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "these tests need {what} in {}: run scripts/test.sh, which installs it (or set \
         POULPE_TEST_PYTHON to a python that has it)",
        p.display()
    );
    p
}

/// Starts `python tests/<script> <args>` and waits for its `READY <port>` line.
pub fn start_server(python: &Path, script: &str, args: &[&std::ffi::OsStr]) -> (Child, u16) {
    let mut child = Command::new(python)
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests")
                .join(script),
        )
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {script}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read READY");
    let port = line
        .trim()
        .strip_prefix("READY ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{script} did not start: {line:?}"));
    (child, port)
}

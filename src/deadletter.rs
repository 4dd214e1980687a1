//! Dead-letter records: one JSON file per dead task, written atomically
//! (temporary file, fsync, rename, fsync of the folder).

use crate::clock::date_utc;
use crate::task::Task;
use crate::task::TaskResult;
use serde::Serialize;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Serialize)]
struct Record<'a> {
    task: &'a Task,
    result: &'a TaskResult,
}

/// Writes `<dir>/<YYYY-MM-DD>/task-<id>.json` (UTC date of `finished_ms`) and returns its path.
pub(crate) fn write(
    dir: &Path,
    task: &Task,
    result: &TaskResult,
    finished_ms: i64,
) -> io::Result<PathBuf> {
    let body = serde_json::to_vec_pretty(&Record { task, result })
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    write_atomic(
        &dir.join(date_utc(finished_ms)),
        &format!("task-{}.json", task.id),
        &body,
    )
}

/// After an operator's retry of a dead task (`POST /task/{id}/retry`): renames its record
/// `<dir>/<YYYY-MM-DD>/task-<id>.json` (the date of `finished_ms`, as `write` named it) to
/// `….json.retried`, so that `poulpe replay` of the folder does not run it once more. The
/// record stays. `Ok(None)` when there is no such file (moved away, or never written).
pub(crate) fn mark_retried(dir: &Path, id: &str, finished_ms: i64) -> io::Result<Option<PathBuf>> {
    let folder = dir.join(date_utc(finished_ms));
    let from = folder.join(format!("task-{id}.json"));
    let to = folder.join(format!("task-{id}.json.retried"));
    match fs::rename(&from, &to) {
        Ok(()) => {
            File::open(&folder)?.sync_all()?;
            Ok(Some(to))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `<folder>/<name>` atomically: temporary file, fsync, rename, fsync of the folder.
pub(crate) fn write_atomic(folder: &Path, name: &str, body: &[u8]) -> io::Result<PathBuf> {
    fs::create_dir_all(folder)?;
    let path = folder.join(name);
    let tmp = folder.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    File::open(folder)?.sync_all()?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::{result, task};
    use crate::task::State;

    #[test]
    fn a_retried_record_is_renamed_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = task("job-2", State::Running, 0);
        let p = write(dir.path(), &t, &result("job-2"), 86_400_000).expect("write");
        let to = mark_retried(dir.path(), "job-2", 86_400_000).expect("rename");
        assert_eq!(
            to,
            Some(dir.path().join("1970-01-02/task-job-2.json.retried"))
        );
        assert!(!p.exists());
        assert_eq!(
            mark_retried(dir.path(), "job-2", 86_400_000).expect("again"),
            None,
            "nothing left to rename"
        );
    }

    #[test]
    fn writes_a_complete_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = task("job-1", State::Running, 0);
        let p = write(dir.path(), &t, &result("job-1"), 0).expect("write");
        assert_eq!(p, dir.path().join("1970-01-01/task-job-1.json"));
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(&p).expect("read")).expect("json");
        assert_eq!(v["task"]["id"], "job-1");
        assert_eq!(v["result"]["status"], "succeeded");
        let leftovers = fs::read_dir(p.parent().expect("parent"))
            .expect("dir")
            .count();
        assert_eq!(leftovers, 1, "no temporary file left");
    }
}

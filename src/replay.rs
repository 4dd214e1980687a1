//! `poulpe replay FILE_OR_DIR… [--host H] [--port P] [--token T]`: resubmits the dead-letter
//! records of `--dead` to a running server, each once, after checking every one of them.

use crate::config::{flags, process_env, Env};
use crate::task::{parse_task, ExecPolicy, Limits, TaskError};
use serde_json::{Map, Value};
use std::collections::hash_map::{Entry, HashMap};
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `poulpe replay --help` prints.
const HELP: &str =
    "poulpe replay - submit dead-letter records (--dead DIR) to a running poulpe again

USAGE:
  poulpe replay FILE_OR_DIR... [--host H] [--port P] [--token T]

Folders are searched for task-*.json at any depth. All files are checked first: one broken,
and nothing is submitted. Accepted records are renamed <file>.replayed (replayed once).

FLAGS:
  --host <v>       the server's address [default: 127.0.0.1]
  -p, --port <v>   the server's port [default: POULPE_PORT, else 8000]
  --token <v>      the server's --token [default: POULPE_TOKEN]
  -h, --help       print this help

Exit code 0 when every record was replayed (or was already), 1 when some were not (refused,
server unreachable), 2 on bad arguments or a broken file.";

/// Why a file cannot be replayed; found before anything is submitted.
#[derive(Debug)]
enum Broken {
    /// The file cannot be read.
    Read(std::io::Error),
    /// The file is not JSON.
    NotJson(serde_json::Error),
    /// JSON, but not `{"task":{...},"result":{...}}` as `--dead` writes it.
    NotRecord(&'static str),
    /// The server's parser would refuse the task.
    Refused(TaskError),
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Broken::Read(e) => write!(f, "cannot read it: {e}"),
            Broken::NotJson(e) => write!(f, "not JSON: {e}"),
            Broken::NotRecord(why) => write!(f, "not a dead-letter record: {why}"),
            Broken::Refused(e) => write!(f, "the server would refuse its task: {e}"),
        }
    }
}

/// What the server made of one submit.
enum Answer {
    /// Accepted (200).
    Accepted,
    /// Refused, with the status and the server's reason.
    Refused(u16, String),
    /// No answer: the server is down, or the connection broke.
    Unreachable(Box<ureq::Error>),
}

/// A record read and checked, ready to submit.
struct Record {
    path: PathBuf,
    /// The file's inode when it was read: a new record written at the same path meanwhile (the
    /// replayed task died again) is not renamed.
    ino: u64,
    id: String,
    body: Value,
}

/// Replays; returns the exit code (0 all replayed or help, 1 refusals, 2 bad input).
pub fn run(args: Vec<OsString>) -> u8 {
    run_in(args, &process_env)
}

/// [`run`] with an explicit environment lookup (`POULPE_PORT`, `POULPE_TOKEN`).
fn run_in(args: Vec<OsString>, env: Env<'_>) -> u8 {
    let args = args.into_iter().map(flags::normalize).collect();
    let mut pargs = pico_args::Arguments::from_vec(args);
    if pargs.contains(["-h", "--help"]) {
        println!("{HELP}");
        return 0;
    }
    let (host, port) = match crate::probe::server(&mut pargs, env) {
        Ok(hp) => hp,
        Err(e) => return usage(&e),
    };
    let token = match pargs.opt_value_from_str::<_, String>(flags::TOKEN.key) {
        Ok(t) => t.or_else(|| flags::TOKEN.env_value(env)),
        Err(e) => return usage(&format!("--token: {e}")),
    };
    let inputs = pargs.finish();
    if inputs.is_empty() {
        return usage("give the dead-letter files or folders to replay");
    }
    if let Some(flag) = inputs.iter().find(|a| a.to_string_lossy().starts_with('-')) {
        return usage(&format!("unknown argument {}", flag.to_string_lossy()));
    }

    // Every input is read and checked before anything is submitted.
    let (mut todo, mut done) = (Vec::new(), Vec::new());
    for input in &inputs {
        let p = Path::new(input);
        if let Err(e) = collect(p, p.is_dir(), &mut todo, &mut done) {
            return usage(&format!("{}: {e}", p.display()));
        }
    }
    let (todo, done) = (unique(todo), unique(done));
    let (mut records, mut twins) = (Vec::<Record>::new(), Vec::new());
    let mut ids = HashMap::new();
    let mut broken = 0;
    for path in todo {
        match read(&path) {
            Ok(r) if first(&mut ids, r.id.clone()) => records.push(r),
            // The same task died twice: one record is replayed, the other waits.
            Ok(r) => twins.push(r),
            Err(e) => {
                eprintln!("poulpe replay: {}: {e}", path.display());
                broken += 1;
            }
        }
    }
    if broken > 0 {
        eprintln!("poulpe replay: {broken} broken file(s): nothing was submitted");
        return 2;
    }
    for p in &done {
        println!("skipped {}: already replayed", p.display());
    }
    for t in &twins {
        println!(
            "skipped {}: {} is replayed from another file; replay this one later",
            t.path.display(),
            t.id
        );
    }

    let agent = crate::exec::tcp::agent(
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build(),
    );
    let url = format!("http://{host}:{port}/task_in_queue");
    let results = format!("http://{host}:{port}/task_resp/");
    let auth = token.map(|t| format!("Bearer {t}"));
    let (mut replayed, mut refused, mut unrenamed) = (0, twins.len(), false);
    for (i, r) in records.iter().enumerate() {
        // A record whose task the server still holds (pending, dead, or run again since by
        // POST /task/{id}/retry) is not submitted: that would run it once more.
        let held = held(&agent, &results, auth.as_deref(), &r.id);
        let answer = match held {
            Ok(None) => submit(&agent, &url, auth.as_deref(), &r.body),
            Ok(Some(status)) => {
                refused += 1;
                println!(
                    "refused {}: the server still holds {} ({status}): retry it there with \
                     POST /task/{{id}}/retry if it is dead, or replay it once its result has expired",
                    r.path.display(),
                    r.id
                );
                continue;
            }
            Err(a) => a,
        };
        match answer {
            Answer::Accepted => {
                replayed += 1;
                match mark_replayed(r) {
                    Ok(true) => println!("replayed {} as {}", r.path.display(), r.id),
                    Ok(false) => println!(
                        "replayed {} as {}; it has died again: the file now holds its new record",
                        r.path.display(),
                        r.id
                    ),
                    Err(e) => {
                        unrenamed = true;
                        eprintln!(
                            "poulpe replay: {}: replayed as {}, but not renamed ({e}): move it \
                             away",
                            r.path.display(),
                            r.id
                        );
                    }
                }
            }
            Answer::Refused(409, _) => {
                refused += 1;
                println!(
                    "refused {}: {} is still pending on the server",
                    r.path.display(),
                    r.id
                );
            }
            Answer::Refused(code, reason) => {
                refused += 1;
                println!("refused {}: {code} {reason}", r.path.display());
            }
            Answer::Unreachable(e) => {
                eprintln!(
                    "poulpe replay: cannot reach the server at {url}: {e}; {} file(s) not submitted",
                    records.len() - i
                );
                refused += records.len() - i;
                break;
            }
        }
    }
    println!(
        "{replayed} replayed, {} already replayed, {refused} not replayed",
        done.len()
    );
    u8::from(refused > 0 || unrenamed)
}

/// `paths` without a file named twice (on its own and through its folder), in their order.
fn unique(paths: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut seen = HashMap::new();
    paths
        .into_iter()
        .filter(|p| {
            let real = fs::canonicalize(p).unwrap_or_else(|_| p.clone());
            first(&mut seen, real.to_string_lossy().into_owned())
        })
        .collect()
}

/// Whether `key` is new to `seen` (a map rather than a set: the binary has that type already).
fn first(seen: &mut HashMap<String, usize>, key: String) -> bool {
    match seen.entry(key) {
        Entry::Vacant(v) => {
            v.insert(0);
            true
        }
        Entry::Occupied(_) => false,
    }
}

/// Prints a usage error; exit code 2.
fn usage(msg: &str) -> u8 {
    eprintln!("poulpe replay: {msg} (see poulpe replay --help)");
    2
}

/// Adds the records under `p` to `todo`, and those already replayed to `done`. A file named on
/// the command line is taken whatever its name; a folder gives its `task-*.json` files, at any
/// depth, in name order (temporary files and other names are left alone).
fn collect(
    p: &Path,
    is_dir: bool,
    todo: &mut Vec<PathBuf>,
    done: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    if !is_dir {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        if name.ends_with(".replayed") {
            done.push(p.to_path_buf());
        } else {
            fs::metadata(p)?;
            todo.push(p.to_path_buf());
        }
        return Ok(());
    }
    // By name: the `<YYYY-MM-DD>` folders of `--dead` then come oldest first.
    let mut entries = fs::read_dir(p)?.collect::<std::io::Result<Vec<_>>>()?;
    entries.sort_unstable_by_key(|e| e.file_name());
    for e in entries {
        let kind = e.file_type()?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if kind.is_dir() {
            collect(&e.path(), true, todo, done)?;
        } else if name.starts_with("task-") && name.ends_with(".json") {
            todo.push(e.path());
        } else if name.starts_with("task-") && name.ends_with(".json.replayed") {
            done.push(e.path());
        }
    }
    Ok(())
}

/// Reads and checks one record: the submit body of its task, validated as the server would.
fn read(path: &Path) -> Result<Record, Broken> {
    // The inode of the very file read (a new record may replace it at any time).
    let mut f = fs::File::open(path).map_err(Broken::Read)?;
    let ino = f.metadata().map_err(Broken::Read)?.ino();
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(Broken::Read)?;
    let v: Value = serde_json::from_slice(&bytes).map_err(Broken::NotJson)?;
    if !v.get("result").is_some_and(Value::is_object) {
        return Err(Broken::NotRecord("no \"result\" object"));
    }
    let Some(task) = v.get("task").and_then(Value::as_object) else {
        return Err(Broken::NotRecord("no \"task\" object"));
    };
    let Some(id) = task.get("id").and_then(Value::as_str) else {
        return Err(Broken::NotRecord("the task has no \"id\""));
    };
    let body = submit_body(task)?;
    // The server's own checks, but for what only it knows: its workers (`cc`), its EXEC rules
    // and its mail relay. It refuses those per file.
    let limits = Limits {
        workers: usize::MAX,
        exec: ExecPolicy::Any,
        mail_enabled: true,
        mail_from: None,
    };
    parse_task(&body, &limits, false, crate::clock::now_us()).map_err(Broken::Refused)?;
    Ok(Record {
        path: path.to_path_buf(),
        ino,
        id: id.to_string(),
        body,
    })
}

/// The fields of a stored task that a client sends, as a submit body: not its state, attempts,
/// due time or delay (it runs now), nor what the server decides (`trusted`, `kafka`).
fn submit_body(task: &Map<String, Value>) -> Result<Value, Broken> {
    let mut body = Map::new();
    for k in [
        "id",
        "method",
        "name",
        "cc",
        "timeout",
        "max_retry",
        "retry_interval",
        "callback",
    ] {
        if let Some(v) = task.get(k) {
            body.insert(k.to_string(), v.clone());
        }
    }
    // EXEC keeps its arguments as a list; the other methods their params as a string.
    if let Some(v) = task.get("args").or_else(|| task.get("params")) {
        body.insert("params".to_string(), v.clone());
    }
    // Stored as `Name: value` lines (see `Task::headers`).
    if let Some(h) = task.get("headers") {
        let h = h
            .as_str()
            .ok_or(Broken::NotRecord("the task's \"headers\" is not a string"))?;
        let mut headers = Map::new();
        for line in h.lines() {
            let (k, v) = line.split_once(": ").ok_or(Broken::NotRecord(
                "a line of the task's \"headers\" has no ': '",
            ))?;
            headers.insert(k.to_string(), Value::String(v.to_string()));
        }
        body.insert("headers".to_string(), Value::Object(headers));
    }
    Ok(Value::Object(body))
}

/// What the server holds of task `id` (`base` is `.../task_resp/`): `None` when nothing (its
/// result expired), else its status; `Err` with the answer to report when asking failed.
fn held(
    agent: &ureq::Agent,
    base: &str,
    auth: Option<&str>,
    id: &str,
) -> Result<Option<String>, Answer> {
    let mut url = base.to_string();
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            url.push(char::from(b));
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url.push_str("?timeout=0");
    let mut req = agent.get(&url);
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let mut r = req.call().map_err(|e| Answer::Unreachable(Box::new(e)))?;
    let code = r.status().as_u16();
    let (v, reason) = read_answer(&mut r);
    match code {
        404 => Ok(None),
        200 | 202 => Ok(Some(v["status"].as_str().unwrap_or("pending").to_string())),
        _ => Err(Answer::Refused(code, reason)),
    }
}

/// The JSON of an answer's body (its first 64 KiB; `Null` when it is not JSON), and the reason
/// to report: its `reason`, or the text itself when it is not JSON.
fn read_answer(r: &mut ureq::http::Response<ureq::Body>) -> (Value, String) {
    let mut text = Vec::new();
    let _ = r
        .body_mut()
        .as_reader()
        .take(1 << 16)
        .read_to_end(&mut text);
    match serde_json::from_slice::<Value>(&text) {
        Ok(v) => {
            let reason = v["reason"].as_str().unwrap_or_default().to_string();
            (v, reason)
        }
        Err(_) => (Value::Null, String::from_utf8_lossy(&text).into_owned()),
    }
}

/// POSTs one task (`url` a `&String` as the HTTP executor's: one copy of ureq's generic code).
fn submit(agent: &ureq::Agent, url: &String, auth: Option<&str>, body: &Value) -> Answer {
    let mut req = agent.post(url).content_type("application/json");
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let mut r = match req.send(body.to_string().as_bytes()) {
        Ok(r) => r,
        Err(e) => return Answer::Unreachable(Box::new(e)),
    };
    let code = r.status().as_u16();
    if code == 200 {
        return Answer::Accepted;
    }
    Answer::Refused(code, read_answer(&mut r).1)
}

/// Renames the record to `<name>.replayed` (atomic), unless the file at its path is no longer
/// the one read (the task died again and its new record took the name): then false.
fn mark_replayed(r: &Record) -> std::io::Result<bool> {
    if fs::metadata(&r.path)?.ino() != r.ino {
        return Ok(false);
    }
    let mut to = r.path.clone().into_os_string();
    to.push(".replayed");
    fs::rename(&r.path, &to)?;
    if let Some(dir) = r.path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(true)
}

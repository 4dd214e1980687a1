//! This process among the poulpe nodes that share one Redis prefix: its id (`--node_id`), the
//! registry of nodes and their heartbeats (`Registry`, kept by the Redis store), the start-up
//! check that no live node has this id (`join`), and the list `/sys_info` shows (`Nodes`). The
//! heartbeat thread, which also adopts the tasks of dead nodes, is in [`heartbeat`]; the thread
//! answering this node's clients with the results other nodes record, in [`listen`]; the thread
//! taking other nodes' ready tasks while this node's workers idle, in [`steal`].

pub(crate) mod heartbeat;
pub(crate) mod listen;
pub(crate) mod steal;

use crate::clock::rfc3339_ms;
use crate::store::{Recovered, StoreError};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Longest node id: it is part of Redis keys and of every result.
pub(crate) const ID_MAX: usize = 64;

/// Why a node id is refused.
pub(crate) const ID_RULE: &str =
    "a node id is 1 to 64 characters among ASCII letters, digits, '.', '_' and '-'";

fn id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// Checks a node id: safe in a Redis key (no `:`), in a log line and in JSON, and bounded.
pub(crate) fn check_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() || id.len() > ID_MAX || !id.bytes().all(id_byte) {
        return Err(ID_RULE);
    }
    Ok(())
}

/// `<hostname>-<port>`, the id of a node started without `--node_id`: unique per machine and
/// port, and the same across restarts, so that a restarted node recovers its own tasks. Bytes
/// a node id may not hold become `-`.
pub(crate) fn default_id(port: u16) -> String {
    let mut id: String = hostname()
        .bytes()
        .take(ID_MAX - 6)
        .map(|b| if id_byte(b) { b as char } else { '-' })
        .collect();
    if id.is_empty() {
        id.push_str("poulpe");
    }
    id.push('-');
    // As a u64: the binary's copy of integer formatting.
    id.push_str(&u64::from(port).to_string());
    id
}

/// The machine's name: `/proc/sys/kernel/hostname`, else `gethostname(2)`, else empty.
fn hostname() -> String {
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        if !s.trim().is_empty() {
            return s.trim().to_string();
        }
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname(2) writes at most `buf.len()` bytes into `buf`.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

static OWN: OnceLock<Box<str>> = OnceLock::new();

/// Sets this process's node id, once, at start (`app::start`).
pub(crate) fn set_own(id: &str) {
    let _ = OWN.set(id.into());
}

/// This process's node id, written into every result it finishes; empty before `set_own`
/// (unit tests). A process-wide value: it never changes while the process lives, and passing
/// it to every place a result is made would reach through every stage.
pub(crate) fn own() -> &'static str {
    OWN.get().map_or("", |s| s)
}

/// One live node as the registry holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) id: String,
    pub(crate) workers: u64,
    pub(crate) running: u64,
    /// Unix ms of its last heartbeat, by Redis's clock.
    pub(crate) last_seen_ms: i64,
}

impl Entry {
    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "workers": self.workers,
            "running": self.running,
            "last_seen": rfc3339_ms(self.last_seen_ms),
        })
    }
}

/// What one heartbeat found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Beat {
    /// Live nodes, this one included, sorted by id.
    pub(crate) live: Vec<Entry>,
    /// Nodes whose heartbeat has expired (never this one).
    pub(crate) dead: Vec<String>,
    /// This node's entry had gone: the others took it for dead (a store outage longer than
    /// its ttl) and adopted its tasks.
    pub(crate) was_gone: bool,
}

/// Sorts the registry's entries (id, JSON, in id order) into live and dead ones at `now_ms`
/// (the store's clock); `me` is never dead. An entry that cannot be read counts as dead.
pub(crate) fn read_entries(me: &str, now_ms: i64, pairs: &[String]) -> Beat {
    let mut beat = Beat::default();
    for pair in pairs.chunks(2) {
        let [id, v] = pair else { continue };
        // `from_slice`: the intake's copy of the JSON parser (`from_str` would be another).
        let v: Value = serde_json::from_slice(v.as_bytes()).unwrap_or(Value::Null);
        let seen = v["last_seen"].as_i64().unwrap_or(0);
        let ttl_ms = v["ttl"].as_i64().unwrap_or(0).saturating_mul(1000);
        if now_ms.saturating_sub(seen) <= ttl_ms {
            beat.live.push(Entry {
                id: id.clone(),
                workers: v["workers"].as_u64().unwrap_or(0),
                running: v["running"].as_u64().unwrap_or(0),
                last_seen_ms: seen,
            });
        } else if id != me {
            beat.dead.push(id.clone());
        }
    }
    beat
}

/// What `Registry::join` found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Join {
    /// This node's entry is written: it is live.
    Joined,
    /// A live node holds this id: its heartbeat was at `last_seen_ms`, the store's clock says
    /// `now_ms`; `who` is the holder's process ([`who`]).
    Held {
        last_seen_ms: i64,
        now_ms: i64,
        who: String,
    },
}

/// The registry of the nodes sharing one store, with their heartbeats (the Redis store keeps
/// it; the embedded store serves one node and has none).
pub(crate) trait Registry: Send + Sync {
    /// Writes this node's entry at start, unless a live node holds its id. Also brings keys of
    /// a release before nodes to this one's layout.
    /// `replace`: the `who` of an entry to overwrite although it looks live (a crashed
    /// predecessor on this machine); empty for none.
    fn join(&self, workers: usize, replace: &str) -> Result<Join, StoreError>;

    /// Renews this node's entry (and the cc slots of the attempts in `loads`) and reads the
    /// registry.
    fn beat(&self, workers: usize, loads: &[crate::dispatch::Load]) -> Result<Beat, StoreError>;

    /// Makes some of dead node `dead`'s unfinished tasks this node's, atomically (two nodes
    /// never adopt the same task), as `recover` does; `true` while more are left. Once none is
    /// left its entry goes. Nothing is adopted if it has come back to life.
    fn adopt(&self, dead: &str) -> Result<(Vec<Recovered>, bool), StoreError>;

    /// Marks this node stopped at shutdown, so that the others adopt what it leaves at once.
    fn leave(&self, workers: usize) -> Result<(), StoreError>;

    /// Takes up to `n` of the oldest ready tasks queued on the other live nodes (never this
    /// node's own) that this node can run (without cc, or with cc naming one of its `idle`
    /// workers whose slot is free), atomically making them this node's; their queues skip
    /// them at their claim.
    fn steal(&self, n: usize, idle: &[usize]) -> Result<Vec<crate::task::Task>, StoreError>;

    /// Listens to what the other nodes finish or cancel: calls `on("")` once subscribed (the
    /// caller then looks for what finished while nobody listened), then `on(ids)` with the
    /// space-separated ids each of their messages names, until `stop` is set (`Ok`) or the
    /// subscription or `on` fails (`Err`).
    fn listen(
        &self,
        stop: &AtomicBool,
        on: &mut dyn FnMut(&str) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
}

/// Why this node cannot join.
#[derive(Debug)]
pub enum JoinError {
    /// A live node holds this id (its heartbeat is this many ms old).
    Taken { id: String, age_ms: i64 },
    /// The registry cannot be read or written.
    Store(StoreError),
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::Taken { id, age_ms } => write!(
                f,
                "--node_id: node {id:?} is live on this Redis prefix (its heartbeat was renewed \
                 {age_ms} ms ago): two processes with one id would run the same tasks; give this \
                 one another --node_id, or stop the other"
            ),
            JoinError::Store(e) => write!(f, "--node_id: cannot register this node: {e}"),
        }
    }
}

impl std::error::Error for JoinError {}

/// Registers this node at start. An entry with its id whose heartbeat is within its ttl is
/// taken over at once when its process was on this machine and is gone (a crash and restart:
/// [`gone`]); otherwise it is watched until it is renewed (another live process: refused) or
/// expires (a crashed predecessor elsewhere: taken over).
pub(crate) fn join(reg: &dyn Registry, id: &str, workers: usize) -> Result<(), JoinError> {
    let mut first = None;
    let mut replace = String::new();
    loop {
        match reg.join(workers, &replace).map_err(JoinError::Store)? {
            Join::Joined => return Ok(()),
            Join::Held {
                last_seen_ms,
                now_ms,
                who,
            } => {
                if replace.is_empty() && gone(&who) {
                    log::info!(
                        "node {id}: taking over the entry of this id's earlier process on this \
                         machine, which is gone"
                    );
                    replace = who;
                    continue;
                }
                match first {
                    None => {
                        log::info!(
                            "node {id}: an entry with this id was renewed {} ms ago; waiting to \
                             see whether its process is still alive",
                            now_ms - last_seen_ms
                        );
                        first = Some(last_seen_ms);
                    }
                    Some(f) if f != last_seen_ms => {
                        return Err(JoinError::Taken {
                            id: id.to_string(),
                            age_ms: now_ms - last_seen_ms,
                        })
                    }
                    Some(_) => {}
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// This process, as written in its registry entry: the machine's boot id, its host name, its
/// PID namespace and its PID, separated by spaces.
pub(crate) fn who() -> &'static str {
    static WHO: OnceLock<String> = OnceLock::new();
    WHO.get_or_init(|| {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let ns = std::fs::read_link("/proc/self/ns/pid")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let host: String = hostname().split_whitespace().collect();
        format!(
            "{} {host} {} {}",
            boot.trim(),
            ns.replace(' ', ""),
            std::process::id()
        )
    })
}

/// Whether the process that wrote `holder` (its [`who`]) is certainly gone: it ran on this
/// machine (same boot) under this host name, and either in this PID namespace with a PID that
/// is this process's or no process's, or in another PID namespace (a container started again:
/// its namespace went with it). Two live processes with one node id on one machine need
/// either two PID namespaces and one host name, which this takes for a restart.
fn gone(holder: &str) -> bool {
    let theirs: Vec<&str> = holder.split(' ').collect();
    let mine: Vec<&str> = who().split(' ').collect();
    let (&[boot, host, ns, pid], &[my_boot, my_host, my_ns, my_pid]) =
        (theirs.as_slice(), mine.as_slice())
    else {
        return false;
    };
    if boot.is_empty() || boot != my_boot || host != my_host {
        return false;
    }
    if ns != my_ns {
        return true;
    }
    if pid == my_pid {
        return true;
    }
    let Ok(pid) = pid.parse::<libc::pid_t>() else {
        return false;
    };
    // SAFETY: kill(2) with signal 0 sends nothing; it only asks whether `pid` exists.
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// The nodes `/sys_info` lists: this one's id, and the live nodes as the heartbeat thread last
/// read them (no store round trip per request).
#[derive(Clone)]
pub(crate) struct Nodes {
    pub(crate) own: Arc<str>,
    /// Live nodes, sorted by id; `None` with the embedded store (this node alone).
    pub(crate) live: Option<Arc<Mutex<Vec<Entry>>>>,
}

impl Nodes {
    /// `nodes` of `/sys_info`; `workers` and `running` describe this node when it is alone.
    pub(crate) fn json(&self, workers: usize, running: usize) -> Value {
        match &self.live {
            Some(live) => Value::Array(live.lock().iter().map(Entry::json).collect()),
            None => json!([Entry {
                id: self.own.to_string(),
                workers: workers as u64,
                running: running as u64,
                last_seen_ms: crate::clock::now_ms(),
            }
            .json()]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_short_and_safe_in_keys() {
        for ok in ["a", "web-1.prod_eu", &"x".repeat(ID_MAX)] {
            assert_eq!(check_id(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a:b", "a b", "é", "a/b", "a\n", &"x".repeat(ID_MAX + 1)] {
            assert_eq!(check_id(bad), Err(ID_RULE), "{bad:?}");
        }
        let id = default_id(8000);
        assert!(id.ends_with("-8000"), "{id}");
        assert_eq!(check_id(&id), Ok(()), "{id}");
    }

    #[test]
    fn an_earlier_process_on_this_machine_is_gone_once_its_pid_is() {
        let mine = who().to_string();
        let parts: Vec<&str> = mine.split(' ').collect();
        assert_eq!(parts.len(), 4, "{mine}");
        let with = |boot: &str, ns: &str, pid: &str| format!("{boot} {} {ns} {pid}", parts[1]);
        // A child that has exited: its PID is no process's.
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let dead = child.id().to_string();
        child.wait().expect("wait");
        assert!(gone(&with(parts[0], parts[2], &dead)), "an exited process");
        assert!(
            gone(&mine),
            "this very PID: the earlier process cannot be alive"
        );
        let parent = std::os::unix::process::parent_id().to_string();
        assert!(!gone(&with(parts[0], parts[2], &parent)), "a live process");
        assert!(
            gone(&with(parts[0], "pid:[1]", &parent)),
            "another PID namespace under this host name: a container started again"
        );
        assert!(
            !gone(&with("other-boot", parts[2], &dead)),
            "another machine"
        );
        assert!(!gone(&format!(
            "{} other-host {} {dead}",
            parts[0], parts[2]
        )));
        assert!(!gone(""), "an entry of a release without `who`");
    }

    #[test]
    fn entries_past_their_own_ttl_are_dead_and_this_node_never_is() {
        let e = |seen: i64, ttl: i64| {
            format!(r#"{{"workers":2,"running":1,"last_seen":{seen},"ttl":{ttl}}}"#)
        };
        let pairs: Vec<String> = [
            ("a", e(5_000, 15)),
            ("b", e(6_999, 3)),
            ("bad", "nope".to_string()),
            ("c", e(10_000, 3)),
            ("me", e(0, 3)),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect();
        let beat = read_entries("me", 10_000, &pairs);
        let live: Vec<&str> = beat.live.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(live, ["a", "c"], "a's own ttl of 15 s keeps it");
        assert_eq!(beat.dead, ["b", "bad"]);
        assert_eq!(beat.live[0].workers, 2);
    }
}

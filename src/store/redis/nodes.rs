//! The registry of nodes in Redis (`<p>nodes`, `<p>owned:<node>`; see the key list of
//! [`super`]): joining, heartbeats and leaving (`BEAT`), and the adoption of a dead node's
//! tasks (`RECOVER` in its adoption mode), judged by Redis's own clock.

use super::{recovered, RedisStore};
use crate::dispatch::Load;
use crate::node::{read_entries, Beat, Join, Registry};
use crate::store::{Recovered, StoreError};

/// Most tasks one adoption call takes.
const ADOPT_CHUNK: usize = 500;

/// Writes this node's entry (`ARGV[3]`: `join`, `beat` or `leave`; workers, running and ttl
/// after it), renews the leases of the cc slots this node's attempts hold (pairs of worker and
/// task id from `ARGV[9]`: every running attempt, a slot renewed only if that attempt holds it)
/// and answers whether it was new, Redis's time and the whole registry, sorted by id (here
/// rather than in Rust: a sort of entries would cost the binary a sort of its own). `join`
/// answers `held`, the time and the holder's last heartbeat instead when a live node holds the
/// id, and turns a `running` set of a release before nodes into the hash (owners unknown: dead).
/// Not indented: the text is in the binary, whose size has a budget.
pub(super) const BEAT: &str = concat!(
    lua_alive!(),
    r#"
local k = p .. 'nodes'
local mode = ARGV[3]
if mode == 'join' then
local old = redis.call('HGET', k, me)
if old and alive(old) then
local e = cjson.decode(old)
local who = tostring(e.who or '')
if ARGV[8] == '' or who ~= ARGV[8] then
return {'held', string.format('%.0f', now), string.format('%.0f', e.last_seen), who}
end
end
redis.call('DEL', p .. 'ready:' .. me)
if redis.call('TYPE', p .. 'running').ok == 'set' then
local ids = redis.call('SMEMBERS', p .. 'running')
redis.call('DEL', p .. 'running')
for _, id in ipairs(ids) do redis.call('HSET', p .. 'running', id, '') end
end
end
for i = 9, #ARGV - 1, 2 do
local s = p .. 'slot:' .. ARGV[i]
if redis.call('GET', s) == me .. ' ' .. ARGV[i + 1] then redis.call('PEXPIRE', s, ARGV[6] * 1000) end
end
local seen = now
if mode == 'leave' then seen = 0 end
local fresh = redis.call('HSET', k, me, '{"workers":' .. ARGV[4] .. ',"running":' .. ARGV[5]
.. ',"last_seen":' .. string.format('%.0f', seen) .. ',"ttl":' .. ARGV[6]
.. ',"who":' .. cjson.encode(ARGV[7]) .. '}')
local out = {tostring(fresh), string.format('%.0f', now)}
local all, ids, val = redis.call('HGETALL', k), {}, {}
for i = 1, #all, 2 do
ids[#ids + 1] = all[i]
val[all[i]] = all[i + 1]
end
table.sort(ids)
for _, id in ipairs(ids) do
out[#out + 1] = id
out[#out + 1] = val[id]
end
return out
"#
);

impl RedisStore {
    /// Runs `BEAT` in `mode`; `replace`: the entry a `join` may overwrite although it looks
    /// live (that of a crashed predecessor on this machine).
    /// `loads`: the workers' attempts, whose cc slots it renews.
    fn beat_call(
        &self,
        mode: &str,
        workers: usize,
        loads: &[Load],
        replace: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut call = self.scripts.beat.arg(&self.prefix);
        let running = loads.iter().filter(|l| l.running.is_some()).count();
        call.arg(&self.node)
            .arg(mode)
            .arg(workers)
            .arg(running)
            .arg(self.node_ttl)
            .arg(crate::node::who())
            .arg(replace);
        for l in loads {
            if let Some(id) = &l.running {
                call.arg(l.id).arg(id);
            }
        }
        self.with(|c| call.invoke(c))
    }
}

/// A number in a script's answer (parsed as `u64`, as the store's other numbers are: one copy
/// of the parser).
fn num(s: Option<&String>) -> Result<i64, StoreError> {
    s.and_then(|s| s.parse::<u64>().ok())
        .map(|n| n as i64)
        .ok_or_else(|| StoreError::Corrupt("unexpected answer from the node registry".into()))
}

impl Registry for RedisStore {
    fn join(&self, workers: usize, replace: &str) -> Result<Join, StoreError> {
        let out = self.beat_call("join", workers, &[], replace)?;
        if out.first().map(String::as_str) != Some("held") {
            return Ok(Join::Joined);
        }
        Ok(Join::Held {
            last_seen_ms: num(out.get(2))?,
            now_ms: num(out.get(1))?,
            who: out.get(3).cloned().unwrap_or_default(),
        })
    }

    fn beat(&self, workers: usize, loads: &[Load]) -> Result<Beat, StoreError> {
        let out = self.beat_call("beat", workers, loads, "")?;
        let now = num(out.get(1))?;
        let mut beat = read_entries(&self.node, now, out.get(2..).unwrap_or_default());
        beat.was_gone = num(out.first())? == 1;
        Ok(beat)
    }

    fn adopt(&self, dead: &str) -> Result<(Vec<Recovered>, bool), StoreError> {
        let out: Vec<String> = self.with(|c| {
            // The recovery script, in its adoption mode.
            self.scripts
                .recover
                .arg(&self.prefix)
                .arg(&self.node)
                .arg(dead)
                .arg(ADOPT_CHUNK)
                .invoke(c)
        })?;
        let left = num(out.first())?;
        let mut tasks = Vec::new();
        recovered(out.get(1..).unwrap_or_default(), &mut tasks);
        Ok((tasks, left > 0))
    }

    fn leave(&self, workers: usize) -> Result<(), StoreError> {
        self.beat_call("leave", workers, &[], "").map(|_| ())
    }

    fn steal(&self, n: usize, idle: &[usize]) -> Result<Vec<crate::task::Task>, StoreError> {
        self.steal_call(n, idle)
    }

    fn listen(
        &self,
        stop: &std::sync::atomic::AtomicBool,
        on: &mut dyn FnMut(&str) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.listen_done(stop, on)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{joined, node_store, redis_server};
    use crate::node::{Join, Registry};
    use crate::store::contract;
    use crate::store::{Claim, Store};
    use crate::task::{State, Task};

    fn cli(st: &super::RedisStore, args: &[&str]) -> redis::Value {
        st.with(|c| {
            let mut cmd = redis::cmd(args[0]);
            for a in &args[1..] {
                cmd.arg(*a);
            }
            cmd.query(c)
        })
        .expect("redis command")
    }

    /// Marks node `id` dead: its heartbeat is 0 (as after `leave`).
    fn kill(st: &super::RedisStore, id: &str) {
        cli(
            st,
            &[
                "HSET",
                "t:nodes",
                id,
                r#"{"workers":1,"running":0,"last_seen":0,"ttl":3}"#,
            ],
        );
    }

    /// Two live nodes on one prefix: a restart recovers only its own tasks; once a node is
    /// dead, its tasks (waiting, ready and running) are adopted once, by one of the others,
    /// and its entry goes.
    #[test]
    fn a_live_nodes_tasks_are_never_recovered_and_a_dead_nodes_are_adopted_once() {
        let s = redis_server();
        let (a, b, c) = (joined(&s, "a", 1), joined(&s, "b", 1), joined(&s, "c", 1));
        a.insert(&[
            contract::task("a-wait", State::Delayed, 99),
            contract::task("a-run", State::Ready, 1),
        ])
        .expect("insert");
        assert!(a
            .claim(&contract::task("a-run", State::Ready, 1))
            .expect("claim"));
        b.insert(&[contract::task("b-wait", State::Delayed, 5)])
            .expect("insert");
        let mut got: Vec<String> = b
            .recover()
            .expect("recover")
            .into_iter()
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(got, ["b-wait"], "a is live: its tasks stay its own");

        kill(&a, "a");
        let beat = b.beat(1, &[]).expect("beat");
        assert_eq!(beat.dead, ["a"]);
        let ids: Vec<&str> = beat.live.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        let (mut took, more) = b.adopt("a").expect("adopt");
        assert!(!more);
        took.sort_by(|x, y| x.id.cmp(&y.id));
        got = took.iter().map(|r| r.id.to_string()).collect();
        assert_eq!(got, ["a-run", "a-wait"]);
        assert!(took[0].was_running && !took[1].was_running);
        assert_eq!(took[1].due_us, 99, "a waiting task keeps its due time");
        let (again, _) = c.adopt("a").expect("adopt");
        assert!(again.is_empty(), "adopted once: {again:?}");
        assert!(
            b.beat(1, &[]).expect("beat").dead.is_empty(),
            "a's entry went"
        );
        // Adopted tasks are b's: c's restart leaves them alone, b's takes them.
        assert!(c.recover().expect("recover").is_empty());
        assert_eq!(b.recover().expect("recover").len(), 3);
    }

    /// A node whose id a live node holds is told so; a stopped one's id is free at once.
    #[test]
    fn an_id_held_by_a_live_node_is_refused_and_free_once_it_left() {
        let s = redis_server();
        let (a1, a2) = (node_store(&s, "a"), node_store(&s, "a"));
        assert_eq!(a1.join(2, "").expect("join"), Join::Joined);
        assert!(matches!(a2.join(2, "").expect("join"), Join::Held { .. }));
        a1.leave(2).expect("leave");
        assert_eq!(a2.join(2, "").expect("join"), Join::Joined);
    }

    /// A `running` set of a release before nodes becomes a hash when a node joins, and its
    /// tasks (no owner) are recovered by that node.
    #[test]
    fn an_old_running_set_is_migrated_and_its_tasks_recovered() {
        let s = redis_server();
        let st = node_store(&s, "n");
        cli(
            &st,
            &[
                "HSET",
                "t:task:old",
                "state",
                "running",
                "due",
                "7",
                "data",
                "{}",
            ],
        );
        cli(&st, &["SADD", "t:live", "old"]);
        cli(&st, &["SADD", "t:running", "old"]);
        assert_eq!(st.join(1, "").expect("join"), Join::Joined);
        let rec = st.recover().expect("recover");
        assert_eq!(rec.len(), 1);
        assert!(rec[0].was_running);
        assert_eq!(st.summary(10).expect("summary").running_total, 0);
    }

    /// A task with cc holds its worker's slot while its attempt runs: another node's claim of a
    /// task on that worker is refused (`Busy`, the task still ready) until the attempt ends or
    /// its lease has passed; the heartbeat renews the lease, a free only frees its own
    /// attempt's slot, and a task without cc takes none.
    #[test]
    fn a_cc_slot_is_held_across_nodes_while_its_attempt_runs() {
        let s = redis_server();
        let (a, b) = (joined(&s, "a", 1), joined(&s, "b", 1));
        let cc = |id: &str| Task {
            cc: vec![0],
            ..contract::task(id, State::Ready, 1)
        };
        let (a1, a2, b1, b2) = (cc("a1"), cc("a2"), cc("b1"), cc("b2"));
        a.insert(&[a1.clone(), a2.clone()]).expect("insert");
        b.insert(&[b1.clone(), b2.clone()]).expect("insert");
        let plain = contract::task("plain", State::Ready, 1);
        b.insert(std::slice::from_ref(&plain)).expect("insert");
        let slot = |w: &str| -> redis::Value { cli(&a, &["GET", &format!("t:slot:{w}")]) };
        let held = |v: &str| redis::Value::BulkString(v.as_bytes().to_vec());

        assert_eq!(b.claim_on(&plain, 0), Ok(Claim::Won), "no cc: no slot");
        assert_eq!(slot("0"), redis::Value::Nil);
        assert_eq!(a.claim_on(&a1, 0), Ok(Claim::Won));
        assert_eq!(slot("0"), held("a a1"));
        assert_eq!(b.claim_on(&b1, 0), Ok(Claim::Busy));
        assert_eq!(b.status("b1").expect("status"), Some(State::Ready));
        assert_eq!(b.claim_on(&b1, 1), Ok(Claim::Won), "slot 1 is free");
        b.release(&b1, 1);
        assert_eq!(slot("1"), redis::Value::Nil, "freed");

        // The heartbeat renews the lease of what a holds (to --node_ttl, 3 s here).
        cli(&a, &["PEXPIRE", "t:slot:0", "100000"]);
        let load = crate::dispatch::Load {
            id: 0,
            queued: 0,
            running: Some("a1".into()),
        };
        a.beat(1, &[load]).expect("beat");
        let pttl = match cli(&a, &["PTTL", "t:slot:0"]) {
            redis::Value::Int(ms) => ms,
            v => panic!("PTTL: {v:?}"),
        };
        assert!(pttl > 0 && pttl <= 3000, "renewed to --node_ttl: {pttl}");

        // Held until released, for a's own next task too; a free by another attempt than the
        // holder's leaves it alone.
        assert_eq!(a.claim_on(&a2, 0), Ok(Claim::Busy));
        a.release(&a2, 0);
        assert_eq!(slot("0"), held("a a1"), "not a2's: left alone");
        a.release(&a1, 0);
        assert_eq!(a.claim_on(&a2, 0), Ok(Claim::Won));
        assert_eq!(slot("0"), held("a a2"));
        assert_eq!(a.claim_on(&cc("gone"), 0), Ok(Claim::Lost), "no such task");
        assert_eq!(a.claim_on(&a2, 0), Ok(Claim::Lost), "running already");
        a.release(&a2, 0);
        let a3 = cc("a3");
        a.insert(std::slice::from_ref(&a3)).expect("insert");
        assert_eq!(a.claim_on(&a3, 0), Ok(Claim::Won));
        a.release(&a3, 0);
        assert_eq!(slot("0"), redis::Value::Nil, "freed");
        assert_eq!(b.claim_on(&b2, 0), Ok(Claim::Won));

        // A dead node's slot is free once its lease has passed.
        cli(&a, &["SET", "t:slot:2", "c gone", "PX", "1"]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b3 = cc("b3");
        b.insert(std::slice::from_ref(&b3)).expect("insert");
        assert_eq!(b.claim_on(&b3, 2), Ok(Claim::Won));
        assert_eq!(slot("2"), held("b b3"));
    }

    /// Only a task's owner takes it due or claims it: another node's entry for the id (its
    /// queue or timer still holding a task cancelled there and submitted again here) gets
    /// nothing, and the owner gets it as before.
    #[test]
    fn only_the_owner_takes_a_task_due_or_claims_it() {
        let s = redis_server();
        let (a, b) = (node_store(&s, "a"), node_store(&s, "b"));
        let (x, y) = (
            contract::task("x", State::Ready, 1),
            contract::task("y", State::Delayed, 1),
        );
        a.insert(&[x.clone(), y]).expect("insert");
        assert!(!b.claim(&x).expect("claim"), "a's ready task");
        assert!(
            b.take_due("y", 1).expect("take").is_none(),
            "a's delayed task"
        );
        assert!(a.take_due("y", 1).expect("take").is_some());
        assert!(a.claim(&x).expect("claim"));
    }
}

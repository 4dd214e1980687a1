//! Shared work between the nodes of one prefix: each node's index of the ready tasks it owns
//! and queues in memory (`<p>ready:<node>`, kept by the scripts of [`super`]), and `STEAL`,
//! which moves the oldest of the other live nodes' ready tasks to an idle node.

use super::{ready_task, RedisStore};
use crate::store::StoreError;
use crate::task::Task;

/// Takes up to `ARGV[3]` of the oldest entries of the other live nodes' ready indexes that are
/// 500 ms old or more by Redis's clock (a task its node is about to claim is left to it) and
/// that this node can run: a task without cc, or one whose cc names a worker of this node that
/// is idle (`ARGV[4]`...) and whose slot (`<p>slot:<w>`) no attempt holds; each such worker is
/// given one task of its cc at most. Each task taken becomes this node's (`node` field, owned
/// sets, ready index, scored with this call's time so that it too is left to its new node for
/// 500 ms: no task bounces between idle nodes) and its data is answered. It looks at up to
/// `LOOK` entries of each node's index, oldest first: an entry whose task is no longer ready
/// and that node's is dropped (stale), one with cc that this node cannot run now is passed
/// over and stays (so tasks queued behind a backlog of cc tasks are still found). The node
/// that queued a task taken finds it another node's at its claim and skips it. Not indented,
/// as `BEAT`.
pub(super) const STEAL: &str = concat!(
    lua_alive!(),
    r#"
local n = tonumber(ARGV[3])
local LOOK, PAGE = 256, 64
local free = {}
for i = 4, #ARGV do
if redis.call('EXISTS', p .. 'slot:' .. ARGV[i]) == 0 then free[tonumber(ARGV[i])] = true end
end
-- The task's cc list, {} without cc, or nil when this node cannot run it now.
local function cc_of(data)
if not data then return nil end
if not string.find(data, '"cc":', 1, true) then return {} end
local ok, task = pcall(cjson.decode, data)
if not ok then return nil end
if task.cc == nil then return {} end
if type(task.cc) ~= 'table' then return nil end
for _, w in ipairs(task.cc) do
if free[w] then return task.cc end
end
return nil
end
local now = t[1] * 1000000 + t[2]
local old = string.format('%.0f', now - 500000)
now = string.format('%.0f', now)
local all, c = redis.call('HGETALL', p .. 'nodes'), {}
for i = 1, #all, 2 do
local o = all[i]
if o ~= me and alive(all[i + 1]) then
local z, got, kept, seen = p .. 'ready:' .. o, 0, 0, 0
while got < n and seen < LOOK do
local r = redis.call('ZRANGEBYSCORE', z, '-inf', old, 'WITHSCORES', 'LIMIT', kept, PAGE)
if #r == 0 then break end
for j = 1, #r, 2 do
local id = r[j]
local v = redis.call('HMGET', p .. 'task:' .. id, 'state', 'node', 'data')
seen = seen + 1
if v[1] ~= 'ready' or v[2] ~= o then
redis.call('ZREM', z, id)
else
kept = kept + 1
local cc = cc_of(v[3])
if cc then
c[#c + 1] = {tonumber(r[j + 1]), o, id, v[3], cc}
got = got + 1
end
end
end
if #r < 2 * PAGE then break end
end
end
end
table.sort(c, function(a, b) return a[1] < b[1] end)
local out = {}
for _, e in ipairs(c) do
if #out >= n then break end
local o, id, cc = e[2], e[3], e[5]
local ok = #cc == 0
for _, w in ipairs(cc) do
if free[w] then
free[w] = nil
ok = true
break
end
end
if ok then
local k = p .. 'task:' .. id
redis.call('ZREM', p .. 'ready:' .. o, id)
redis.call('HSET', k, 'node', me)
redis.call('SREM', p .. 'owned:' .. o, id)
redis.call('SADD', p .. 'owned:' .. me, id)
redis.call('ZADD', p .. 'ready:' .. me, now, id)
out[#out + 1] = e[4]
end
end
return out
"#
);

impl RedisStore {
    /// Runs `STEAL` for at most `n` tasks, with cc ones only for this node's `idle` workers. A
    /// task whose data this node cannot read (written by a newer release) is logged and left
    /// out: it stays this node's, ready in the store, for its next start or another node's
    /// steal; the others run.
    pub(super) fn steal_call(&self, n: usize, idle: &[usize]) -> Result<Vec<Task>, StoreError> {
        let data: Vec<String> = self.with(|c| {
            let mut inv = self.scripts.steal.prepare_invoke();
            inv.arg(&self.prefix).arg(&self.node).arg(n);
            for w in idle {
                inv.arg(*w);
            }
            inv.invoke(c)
        })?;
        let mut tasks = Vec::with_capacity(data.len());
        for d in &data {
            match ready_task(d) {
                Ok(t) => tasks.push(t),
                Err(e) => log::error!("steal: a task taken from another node is left: {e}"),
            }
        }
        Ok(tasks)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{joined, redis_server};
    use crate::node::Registry;
    use crate::store::contract;
    use crate::store::Store;
    use crate::task::{State, Task};

    fn ids(tasks: &[Task]) -> Vec<&str> {
        tasks.iter().map(|t| t.id.as_str()).collect()
    }

    /// A ready task due at `due` µs with cc worker `w`.
    fn on(id: &str, due: u64, w: usize) -> Task {
        let mut t = contract::task(id, State::Ready, due);
        t.cc = vec![w];
        t
    }

    /// The ids in order of name (tasks taken at one moment share their score).
    fn sorted(tasks: &[Task]) -> Vec<&str> {
        let mut v = ids(tasks);
        v.sort_unstable();
        v
    }

    /// An idle node takes the other live nodes' oldest ready tasks (here without cc: it names
    /// no idle worker), never its own, a
    /// delayed one (until the timer makes it ready), a claimed or cancelled one, or a dead
    /// node's; the node that queued a task it took can no longer claim it, the thief can, and
    /// a task it took may be taken from it the same way, but only after 500 ms.
    #[test]
    fn an_idle_node_takes_the_oldest_ready_tasks_of_the_other_live_nodes() {
        let s = redis_server();
        let (a, b, c) = (joined(&s, "a", 1), joined(&s, "b", 1), joined(&s, "c", 1));
        let mut cc = contract::task("a-cc", State::Ready, 1);
        cc.cc = vec![0];
        a.insert(&[
            contract::task("a-3", State::Ready, 30),
            contract::task("a-1", State::Ready, 10),
            contract::task("a-run", State::Ready, 5),
            contract::task("a-gone", State::Ready, 6),
            contract::task("a-later", State::Delayed, 7),
            cc,
        ])
        .expect("insert");
        c.insert(&[contract::task("c-2", State::Ready, 20)])
            .expect("insert");
        b.insert(&[contract::task("b-0", State::Ready, 1)])
            .expect("insert");
        assert!(a
            .claim(&contract::task("a-run", State::Ready, 5))
            .expect("claim"));
        a.cancel("a-gone", i64::MAX / 2).expect("cancel");

        let took = b.steal(2, &[]).expect("steal");
        assert_eq!(ids(&took), ["a-1", "c-2"], "oldest first, across nodes");
        assert!(took.iter().all(|t| t.state == State::Ready));
        assert!(
            !a.claim(&took[0]).expect("claim"),
            "a's queue entry is stale"
        );
        assert!(b.claim(&took[0]).expect("claim"), "the thief runs it");

        // a-later is taken once the timer made it ready; c-2, b's now, is left to b for 500 ms
        // (scored with the steal's time), then taken from it like any other.
        assert!(a.take_due("a-later", 7).expect("take").is_some());
        let took = c.steal(10, &[]).expect("steal");
        assert_eq!(
            ids(&took),
            ["b-0", "a-later", "a-3"],
            "not c-2, just taken by b"
        );
        assert!(
            b.steal(10, &[]).expect("steal").is_empty(),
            "c's are fresh too"
        );
        std::thread::sleep(std::time::Duration::from_millis(600));
        assert_eq!(
            sorted(&b.steal(10, &[]).expect("steal")),
            ["a-3", "a-later", "b-0"]
        );
        assert!(
            b.steal(10, &[]).expect("steal").is_empty(),
            "a's cc task stays"
        );

        // A task queued just now is left to its node for 500 ms.
        let mut fresh = contract::task("a-now", State::Ready, 0);
        fresh.due_us = crate::clock::now_us();
        a.insert(&[fresh]).expect("insert");
        assert!(
            b.steal(10, &[]).expect("steal").is_empty(),
            "a-now is fresh"
        );

        // A node that left (dead) keeps its ready tasks for adoption: none is taken.
        c.insert(&[contract::task("c-9", State::Ready, 1)])
            .expect("insert");
        c.leave(1).expect("leave");
        std::thread::sleep(std::time::Duration::from_millis(600));
        let took = a.steal(10, &[]).expect("steal");
        assert_eq!(
            sorted(&took),
            ["a-3", "a-later", "b-0", "c-2"],
            "b's, not c-9"
        );
        assert!(a.steal(10, &[]).expect("steal").is_empty());
    }

    /// A task with cc is taken only by a node with an idle worker that its cc names and whose
    /// slot no attempt holds; one it cannot run now stays in its node's index, for later or
    /// another node. A `"cc":` key elsewhere in the task (a mail's parameters) is no cc.
    #[test]
    fn a_task_with_cc_is_taken_only_for_an_idle_worker_it_names_whose_slot_is_free() {
        use crate::store::Claim;
        let s = redis_server();
        let (a, b) = (joined(&s, "a", 2), joined(&s, "b", 2));
        let hold = on("hold", 1, 0);
        let mut mail = contract::task("mail", State::Ready, 4);
        mail.params = r#"{"cc":"x@example.com"}"#.into();
        a.insert(&[hold.clone(), on("cc-1", 2, 1), on("cc-0", 3, 0), mail])
            .expect("insert");
        assert_eq!(a.claim_on(&hold, 0).expect("claim"), Claim::Won);
        std::thread::sleep(std::time::Duration::from_millis(600));

        assert_eq!(
            ids(&b.steal(10, &[0]).expect("steal")),
            ["mail"],
            "cc-1 names worker 1, and cc-0's slot is held"
        );
        let took = b.steal(10, &[1]).expect("steal");
        assert_eq!(ids(&took), ["cc-1"]);
        assert_eq!(b.claim_on(&took[0], 1).expect("claim"), Claim::Won);
        a.release(&hold, 0);
        let took = b.steal(10, &[0]).expect("steal");
        assert_eq!(
            ids(&took),
            ["cc-0"],
            "left in a's index until its slot was free"
        );
        assert_eq!(
            a.claim_on(&on("cc-0", 3, 0), 0).expect("claim"),
            Claim::Lost,
            "a's queue entry is stale"
        );
        assert_eq!(b.claim_on(&took[0], 0).expect("claim"), Claim::Won);
        assert!(b.steal(10, &[0, 1]).expect("steal").is_empty());
    }

    /// Tasks with cc that no idle worker here can run, at the head of a node's index, do not
    /// hide the tasks queued behind them; and one call gives each idle worker one task of its
    /// cc at most (a second would wait here behind the first while another worker idles).
    #[test]
    fn cc_tasks_this_node_cannot_run_are_passed_over_and_each_idle_worker_gets_one() {
        use crate::store::Claim;
        let s = redis_server();
        let (a, b) = (joined(&s, "a", 2), joined(&s, "b", 2));
        let mut tasks: Vec<Task> = (0..300).map(|i| on(&format!("cc-{i}"), 1 + i, 0)).collect();
        tasks.push(contract::task("plain", State::Ready, 1000));
        a.insert(&tasks).expect("insert");
        assert_eq!(
            a.claim_on(&tasks[0], 0).expect("claim"),
            Claim::Won,
            "slot 0 held"
        );
        std::thread::sleep(std::time::Duration::from_millis(600));
        assert_eq!(
            ids(&b.steal(1, &[0]).expect("steal")),
            Vec::<&str>::new(),
            "slot 0 is held: nothing of 256 looked at runs here, plain is beyond them"
        );
        a.release(&tasks[0], 0);
        a.cancel("cc-0", i64::MAX / 2).expect("cancel");
        let took = b.steal(2, &[0, 1]).expect("steal");
        assert_eq!(
            ids(&took),
            ["cc-1"],
            "one for worker 0, none of its cc for worker 1"
        );

        let c = joined(&s, "c", 2);
        let mut tasks: Vec<Task> = (0..10)
            .map(|i| on(&format!("c-cc-{i}"), 1 + i, 0))
            .collect();
        tasks.push(contract::task("c-plain", State::Ready, 20));
        c.insert(&tasks).expect("insert");
        std::thread::sleep(std::time::Duration::from_millis(600));
        assert_eq!(
            ids(&b.steal(1, &[1]).expect("steal")),
            ["c-plain"],
            "the plain task behind ten cc ones (for worker 0, busy here) is found"
        );
    }
}

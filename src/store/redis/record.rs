//! `RECORD`: the outcome stage's batch of changes (final results, retries, callback tasks) in one
//! script call. A `MULTI` pipeline of the same writes cost the client seven or eight commands
//! per task to encode and as many `QUEUED` replies plus the `EXEC` array to parse, and Redis as
//! many commands to queue and then run.

use super::{encode, state_name, RedisStore};
use crate::store::{list, Change, StoreError};

/// Applies the changes after the prefix and this node: groups of five arguments, `f` (a final
/// result: id, record, ttl ms, expiry unix ms; the task, its listings, its running entry and
/// its due entry go), `r` (a retry: id, state, due µs, data; its running entry goes, its due
/// entry is set) or `i` (a new task of this node: id, state, due µs, data; listed, and due when
/// it waits). The final ids are published on `<p>done` as `<node> <id>...`, once stored. Not
/// indented, as `BEAT`.
pub(super) const RECORD: &str = r"
local p, me = ARGV[1], ARGV[2]
local done = {}
for i = 3, #ARGV, 5 do
local kind, id = ARGV[i], ARGV[i + 1]
local k = p .. 'task:' .. id
if kind == 'f' then
redis.call('DEL', k)
redis.call('SREM', p .. 'live', id)
redis.call('HDEL', p .. 'running', id)
redis.call('SREM', p .. 'owned:' .. me, id)
redis.call('ZREM', p .. 'due', id)
redis.call('SET', p .. 'result:' .. id, ARGV[i + 2], 'PX', ARGV[i + 3])
redis.call('ZADD', p .. 'results', ARGV[i + 4], id)
done[#done + 1] = id
else
redis.call('HSET', k, 'state', ARGV[i + 2], 'due', ARGV[i + 3], 'data', ARGV[i + 4])
if kind == 'r' then
redis.call('HDEL', p .. 'running', id)
redis.call('ZADD', p .. 'due', ARGV[i + 3], id)
else
redis.call('HSET', k, 'node', me)
redis.call('SADD', p .. 'owned:' .. me, id)
redis.call('SADD', p .. 'live', id)
if ARGV[i + 2] == 'delayed' or ARGV[i + 2] == 'retry_wait' then
redis.call('ZADD', p .. 'due', ARGV[i + 3], id)
end
end
end
end
if #done > 0 then
redis.call('PUBLISH', p .. 'done', me .. ' ' .. table.concat(done, ' '))
end
return 0
";

impl RedisStore {
    /// Writes `changes` with one `RECORD` call.
    pub(super) fn record_call(&self, changes: &[Change]) -> Result<(), StoreError> {
        let now = crate::clock::now_ms();
        let mut inv = self.scripts.record.prepare_invoke();
        inv.arg(&self.prefix).arg(&self.node);
        for ch in changes {
            match ch {
                Change::Finish {
                    result,
                    expires_ms,
                    task,
                } => {
                    let record = list::encode_record(result, task.as_ref())?;
                    inv.arg("f")
                        .arg(&result.id)
                        .arg(record)
                        .arg((expires_ms - now).max(1))
                        .arg(*expires_ms);
                }
                Change::Retry(t) | Change::Insert(t) => {
                    let kind = if matches!(ch, Change::Retry(_)) {
                        "r"
                    } else {
                        "i"
                    };
                    inv.arg(kind)
                        .arg(&t.id)
                        .arg(state_name(t.state))
                        .arg(t.due_us)
                        .arg(encode(t)?);
                }
            }
        }
        let t0 = std::time::Instant::now();
        let res = self.with(|c| inv.invoke::<i64>(c)).map(|_| ());
        crate::metrics::STORE_COMMIT.since(t0);
        res
    }
}

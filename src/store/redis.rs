//! The Redis store (`--redis URL`): tasks, due times, running marks and results in Redis under a
//! key prefix, reached through an r2d2 pool of synchronous connections. The submissions given
//! together (`insert_many`) go in one Lua call per round trip; claims are atomic Lua scripts that say
//! whether the caller won. Several nodes (`--node_id`) may share a prefix: each unfinished task
//! has an owner node, and the registry of nodes with their heartbeats is in [`nodes`].
//!
//! Keys (prefix `poulpe:` by default):
//! - `<p>task:<id>` hash: `state`, `due` (unix µs), `data` (task JSON), `node` (its owner: the
//!   node that submitted it, or last took it due, claimed it or adopted it; absent in a task of
//!   a release before nodes, which counts as a dead node's)
//! - `<p>live` set of unfinished ids; `<p>due` sorted set (score = due µs) of waiting ids;
//!   `<p>running` hash: id with an attempt running -> the node running it (a set before nodes:
//!   turned into a hash with unknown owners when a node joins)
//! - `<p>owned:<node>` set: the unfinished ids owned by that node, kept by the same scripts that
//!   change the `node` field, so that a dead node's tasks are found without a scan.
//!   An id whose task has gone (finished by another node after an adoption) is dropped when
//!   found. Only the owner takes a task due or claims it: another node's entry for its id is
//!   stale (the id cancelled and used again elsewhere, or the task adopted meanwhile).
//! - `<p>ready:<node>` sorted set (score = due µs, or acceptance µs): the ready tasks
//!   that node owns and queues in memory, for the idle nodes to take ([`steal`]); an id leaves
//!   it when claimed, cancelled, taken by another node or recovered
//! - `<p>nodes` hash: node id -> `{"workers","running","last_seen","ttl"}` (`last_seen` in unix
//!   ms of Redis's own `TIME`, so that nodes' clocks need not agree; 0 once the node stopped)
//! - `<p>result:<id>` result JSON, with `PEXPIRE` = `--result_ttl`; `<p>results` sorted set
//!   (score = expiry, unix ms) of finished ids, to keep at most `--result_max`
//! - `<p>meta:<key>` small values (cron last fire times)
//! - `<p>slot:<w>` `<node> <task id>`: cc worker `w`'s slot of the cluster, held by that node's
//!   attempt of a task with cc while it runs (taken by the claim; lease `PX` = `--node_ttl`,
//!   renewed by each heartbeat; freed when the attempt ends), so that tasks sharing a cc worker
//!   never run at once on two nodes
//!
//! Channel: `<p>done` gets `<node> <id> <id>...` for the final results a node records or the
//! tasks it cancels, published in the same script that stores them (no round trip of
//! its own), so that the other nodes answer their clients waiting for those ids ([`listen`]).

use super::list::{self, Cursor, ListQuery, Listed, Page, Record, Revive};
use super::{Cancel, Change, Claim, Due, Recovered, Store, StoreError, Summary};
use crate::task::TaskResult;
use crate::task::{State, Task};
use parking_lot::Mutex;
use redis::{Client, Connection, Script};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Most submissions in one `INSERT` call.
const MAX_GROUPS: usize = 512;
/// Most claims folded into one `CLAIM` call.
const MAX_CLAIMS: usize = 64;
/// Reads of a task's record before a cancel gives up (each is stale only if an attempt ran
/// in between).
const CANCEL_TRIES: usize = 5;
/// Socket timeouts for every command.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// The start of the scripts that know nodes: `p` (prefix) and `me` (this node) from `ARGV[1]`
/// and `ARGV[2]`; `now` (unix ms of Redis's clock); `alive(entry)`, whether a registry entry's
/// heartbeat is within its ttl.
macro_rules! lua_alive {
    () => {
        r"
if redis.replicate_commands then redis.replicate_commands() end
local p, me = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local function alive(v)
  local ok, e = pcall(cjson.decode, v)
  return ok and type(e) == 'table' and type(e.last_seen) == 'number'
    and now - e.last_seen <= (tonumber(e.ttl) or 0) * 1000
end
"
    };
}

/// `lua_alive`, then `take(id, out)`, which makes task `id` this node's and waiting for its due
/// time (a running or ready one runs again: at least once; it leaves its former owner's ready
/// index), appending id, due and former state to `out` (a task that has gone leaves `live`).
/// Not indented, as `BEAT`.
macro_rules! lua_prelude {
    () => {
        concat!(
            lua_alive!(),
            r"
local function take(id, out)
local k = p .. 'task:' .. id
local v = redis.call('HMGET', k, 'state', 'due', 'node')
local s, due = v[1], v[2]
if not s then
redis.call('SREM', p .. 'live', id)
return
end
if v[3] then redis.call('ZREM', p .. 'ready:' .. v[3], id) end
if s ~= 'retry_wait' then redis.call('HSET', k, 'state', 'delayed') end
redis.call('HSET', k, 'node', me)
redis.call('HDEL', p .. 'running', id)
redis.call('ZADD', p .. 'due', due, id)
redis.call('SADD', p .. 'owned:' .. me, id)
out[#out + 1] = id
out[#out + 1] = due
out[#out + 1] = s
end
"
        )
    };
}

/// `mine(k)`: the state of task key `k` and its owner when it is this node's (`me`) or has no
/// owner (a task of a release before nodes: then it is not yet in this node's `owned` set),
/// else `false`: a task another node owns is in that node's pool or
/// timer, and an entry here for its id is stale (the task was cancelled and its id used again
/// on another node, or it was adopted while this node was cut off from Redis).
macro_rules! lua_mine {
    () => {
        r"
local function mine(k)
  local v = redis.call('HMGET', k, 'state', 'node')
  if v[2] == me or not v[2] then return v[1], v[2] end
  return false
end
"
    };
}

mod fold;
mod listen;
// After the macros: its scripts use them.
mod nodes;
mod steal;

/// Most claims whose answer was lost that are remembered (for their retries) at once.
const MAX_UNCERTAIN: usize = 10_000;

/// Stores each submit's tasks (groups of id, state, due µs, data and whether a stored result
/// refuses the id) for node `ARGV[2]`, all of a group or none (the duplicate id answered), and
/// lists its ready tasks in the node's ready index. Not indented, as `BEAT`.
const INSERT: &str = r#"
local p, me = ARGV[1], ARGV[2]
local ngroups = tonumber(ARGV[3])
local live, owned, results = p .. 'live', p .. 'owned:' .. me, p .. 'results'
local due_set, ready = p .. 'due', p .. 'ready:' .. me
local i = 4
local out = {}
for g = 1, ngroups do
local n = tonumber(ARGV[i]); i = i + 1
local start = i
local dup = false
local seen = {}
for t = 0, n - 1 do
local id, once = ARGV[start + t * 5], ARGV[start + t * 5 + 4] == '1'
if seen[id] or redis.call('EXISTS', p .. 'task:' .. id) == 1
or (once and redis.call('EXISTS', p .. 'result:' .. id) == 1) then dup = id; break end
seen[id] = true
end
if dup then
out[g] = dup
else
for t = 0, n - 1 do
local b = start + t * 5
local id, state, due, data = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]
redis.call('HSET', p .. 'task:' .. id, 'state', state, 'due', due, 'data', data, 'node', me)
redis.call('SADD', live, id)
redis.call('SADD', owned, id)
if redis.call('DEL', p .. 'result:' .. id) == 1 then redis.call('ZREM', results, id) end
if state == 'delayed' or state == 'retry_wait' then
redis.call('ZADD', due_set, due, id)
else
redis.call('ZADD', ready, due, id)
end
end
out[g] = ''
end
i = start + n * 5
end
return out
"#;

/// Moves each id of the (id, due µs) pairs after the prefix, this node and the `again` flag
/// from waiting (delayed or retry_wait; with `again` = '1' also ready) to ready, owned by this
/// node (whose pool it goes to; listed in its ready index, `<p>ready:<node>`), and answers its data, or `false` (nil in the reply) for an id
/// that is not waiting, is another node's (`mine`), or waits for another due time (a stale
/// timer entry: the id was cancelled and submitted again with another delay). Not indented.
const TAKE_DUE_MANY: &str = concat!(
    r"
local p, me = ARGV[1], ARGV[2]
local again = ARGV[3] == '1'
local owned, due, ready = p .. 'owned:' .. me, p .. 'due', p .. 'ready:' .. me
",
    lua_mine!(),
    r#"
local out = {}
for i = 4, #ARGV, 2 do
local id = ARGV[i]
local k = p .. 'task:' .. id
local s, o = mine(k)
local n = (i - 2) / 2
if (s == 'delayed' or s == 'retry_wait' or (again and s == 'ready'))
and redis.call('HGET', k, 'due') == ARGV[i + 1] then
redis.call('HSET', k, 'state', 'ready', 'node', me)
if not o then redis.call('SADD', owned, id) end
redis.call('ZREM', due, id)
redis.call('ZADD', ready, ARGV[i + 1], id)
out[n] = redis.call('HGET', k, 'data')
else
out[n] = false
end
end
return out
"#
);

/// Claims for node `ARGV[2]` each ready task of the (id, running mark, cc slot, lease ms, claim
/// token) groups after it, in order, answering one number each: 1 if it won, 0 if not. A task
/// this very claim (same token, kept in the task's `claim` field) already made running also
/// answers 1: the answer of that call was lost (a timeout), and its worker asks again. A claimed task
/// leaves the node's ready index. A task another node owns is not claimed (`mine`): a stale
/// entry of this node's pool (its id cancelled here, then used again on another node, or the
/// task taken by an idle node) must not run the task here. A group with a slot (a task with cc,
/// on that worker) also takes that slot for the lease, or answers 2 and changes nothing when it
/// is held. An empty running mark instead frees the slot if that attempt still holds it (one
/// script less to load). Not indented, as `BEAT`.
const CLAIM: &str = concat!(
    r"
local p, me = ARGV[1], ARGV[2]
local owned, ready, running = p .. 'owned:' .. me, p .. 'ready:' .. me, p .. 'running'
",
    lua_mine!(),
    r"
local out = {}
for i = 3, #ARGV, 5 do
local id, w, tok = ARGV[i], ARGV[i + 2], ARGV[i + 4]
local k, s, v = p .. 'task:' .. id, p .. 'slot:' .. w, me .. ' ' .. id
local r = 0
local st, o = false, nil
if ARGV[i + 1] ~= '' then st, o = mine(k) end
if ARGV[i + 1] == '' then
if redis.call('GET', s) == v then redis.call('DEL', s) end
elseif st == 'running' and redis.call('HGET', k, 'claim') == tok then
r = 1
elseif st == 'ready' then
if w ~= '' and not redis.call('SET', s, v, 'NX', 'PX', ARGV[i + 3]) then
r = 2
else
redis.call('HSET', k, 'state', 'running', 'data', ARGV[i + 1], 'node', me, 'claim', tok)
if not o then redis.call('SADD', owned, id) end
redis.call('ZREM', ready, id)
redis.call('HSET', running, id, me)
r = 1
end
end
out[#out + 1] = r
end
return out
"
);

/// Writes a batch of outcomes for node `ARGV[2]` in one call, which no other client's command
/// interleaves (a `MULTI` pipeline of single commands cost the outcome thread two replies to
/// parse per command). Its commands cannot fail on keys of these types; were one to fail, the
/// outcome stage writes the whole batch again, and every command here may be repeated. After
/// the prefix and the node come groups of five: `f`, id, result record, its ttl ms and its expiry (unix
/// ms) for a finished task (the task goes, its result is kept); `r`, id, state, due µs and data
/// for a retry (waiting for its due time again); `i` and the same for a new task (a callback).
/// The finished ids are published on `<p>done` as `<node> <id>...`, for the other nodes'
/// waits. Not indented, as `BEAT`.
const RECORD: &str = r"
local p, me = ARGV[1], ARGV[2]
local live, running, owned = p .. 'live', p .. 'running', p .. 'owned:' .. me
local due, results = p .. 'due', p .. 'results'
local done = {}
for i = 3, #ARGV, 5 do
local kind, id = ARGV[i], ARGV[i + 1]
local k = p .. 'task:' .. id
if kind == 'f' then
redis.call('DEL', k)
redis.call('SREM', live, id)
redis.call('HDEL', running, id)
redis.call('SREM', owned, id)
redis.call('ZREM', due, id)
redis.call('SET', p .. 'result:' .. id, ARGV[i + 2], 'PX', ARGV[i + 3])
redis.call('ZADD', results, ARGV[i + 4], id)
done[#done + 1] = id
elseif kind == 'r' then
redis.call('HSET', k, 'state', ARGV[i + 2], 'due', ARGV[i + 3], 'data', ARGV[i + 4])
redis.call('HDEL', running, id)
redis.call('ZADD', due, ARGV[i + 3], id)
else
redis.call('HSET', k, 'state', ARGV[i + 2], 'due', ARGV[i + 3], 'data', ARGV[i + 4], 'node', me)
redis.call('SADD', owned, id)
redis.call('SADD', live, id)
if ARGV[i + 2] == 'delayed' or ARGV[i + 2] == 'retry_wait' then
redis.call('ZADD', due, ARGV[i + 3], id)
end
end
end
if #done > 0 then
redis.call('PUBLISH', p .. 'done', me .. ' ' .. table.concat(done, ' '))
end
return #done
";

/// Cancels a task that has not started, if its record is still `ARGV[3]` (the one its result
/// `ARGV[4]` was made from; else 'changed'), storing that result until `ARGV[5]` (unix ms,
/// `ARGV[6]` ms from now), and tells the other nodes (`<p>done`, from node `ARGV[7]`). Not
/// indented.
const CANCEL: &str = r"
local p, id = ARGV[1], ARGV[2]
local k = p .. 'task:' .. id
local s = redis.call('HGET', k, 'state')
if s == 'delayed' or s == 'ready' or s == 'retry_wait' then
if redis.call('HGET', k, 'data') ~= ARGV[3] then return 'changed' end
local o = redis.call('HGET', k, 'node')
if o then
redis.call('SREM', p .. 'owned:' .. o, id)
redis.call('ZREM', p .. 'ready:' .. o, id)
end
redis.call('DEL', k)
redis.call('SREM', p .. 'live', id)
redis.call('ZREM', p .. 'due', id)
redis.call('SET', p .. 'result:' .. id, ARGV[4], 'PX', ARGV[6])
redis.call('ZADD', p .. 'results', ARGV[5], id)
redis.call('PUBLISH', p .. 'done', ARGV[7] .. ' ' .. id)
return 'cancelled'
elseif s then
return 'running'
elseif redis.call('EXISTS', p .. 'result:' .. id) == 1 then
return 'finished'
end
return 'unknown'
";

/// Stores a dead task `ARGV[2]` again as ready (due `ARGV[4]`, data `ARGV[5]`), owned by node
/// `ARGV[6]`, in place of its result, if that result is still `ARGV[3]` and no task has taken
/// the id since (else 'changed').
const REVIVE: &str = r#"
local p, id = ARGV[1], ARGV[2]
local k = p .. 'task:' .. id
if redis.call('EXISTS', k) == 1 or redis.call('GET', p .. 'result:' .. id) ~= ARGV[3] then
  return 'changed'
end
redis.call('DEL', p .. 'result:' .. id)
redis.call('ZREM', p .. 'results', id)
redis.call('HSET', k, 'state', 'ready', 'due', ARGV[4], 'data', ARGV[5], 'node', ARGV[6])
redis.call('SADD', p .. 'live', id)
redis.call('SADD', p .. 'owned:' .. ARGV[6], id)
redis.call('ZADD', p .. 'ready:' .. ARGV[6], ARGV[4], id)
return 'ok'
"#;

/// A page of unfinished tasks in state `ARGV[2]` by `SSCAN` of the live set, from scan cursor
/// `ARGV[3]`, past id `ARGV[4]` in that batch ('' from its start), examining at most `ARGV[5]`
/// ids, at most `ARGV[6]` tasks of method `ARGV[7]` ('' any) whose id or name holds `ARGV[8]`.
/// A batch is read in id order and resumed after the last id listed, so a task that leaves the
/// set between two pages shifts nothing. A task's JSON is decoded only for a filter that needs
/// it. Answers the cursor and id to go on from ('' when done), then the data of each task.
const LIST_LIVE: &str = r"
local p, want, cur, after = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local cap, limit, m, q = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]
local out = {'', ''}
local seen, n = 0, 0
while true do
  local r = redis.call('SSCAN', p .. 'live', cur, 'COUNT', 200)
  local ids = r[2]
  table.sort(ids)
  for i = 1, #ids do
    local id = ids[i]
    if after == '' or id > after then
      local k = p .. 'task:' .. id
      seen = seen + 1
      if redis.call('HGET', k, 'state') == want then
        local data = redis.call('HGET', k, 'data')
        local keep = q == '' or string.find(id, q, 1, true)
        if m ~= '' or not keep then
          local t = cjson.decode(data)
          keep = (m == '' or t.method == m) and (keep or string.find(t.name, q, 1, true))
        end
        if keep then
          out[#out + 1] = data
          n = n + 1
        end
      end
      if n >= limit or (seen >= cap and i < #ids) then
        out[1], out[2] = cur, id
        return out
      end
    end
  end
  if r[1] == '0' then return out end
  cur, after = r[1], ''
  if seen >= cap then
    out[1], out[2] = cur, ''
    return out
  end
end
";

/// A page of finished tasks of status `ARGV[2]`, newest expiry first, from expiry `ARGV[3]`
/// ('' from the newest) past its first `ARGV[4]` results; the rest as for `LIST_LIVE`. The
/// status is found in the first KiB of the record's first line without decoding it (the whole
/// record is read only when that does not settle it, or to keep it), and the task (after the
/// newline, possibly large) is decoded only for a filter that needs it. Answers the expiry and
/// offset to go on from ('' when done), then each stored record.
const LIST_DONE: &str = r#"
local p, want, top, off = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]) or 0
local cap, limit, m, q = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]
local mark = '"status":"' .. want .. '"'
local out = {'', ''}
local seen, n = 0, 0
while true do
  local r = redis.call('ZREVRANGEBYSCORE', p .. 'results', top == '' and '+inf' or top, '-inf',
    'WITHSCORES', 'LIMIT', top == '' and 0 or off, 200)
  for i = 1, #r, 2 do
    local id, s = r[i], r[i + 1]
    seen = seen + 1
    if s == top then off = off + 1 else top, off = s, 1 end
    local k = p .. 'result:' .. id
    -- The status is in the first line: read its start only (the task after it may be large),
    -- and the whole record only when that start does not settle it or the record is kept.
    local head = redis.call('GETRANGE', k, 0, 1023)
    local cut = string.find(head, '\n', 1, true)
    local at = string.find(cut and string.sub(head, 1, cut - 1) or head, mark, 1, true)
    local v = #head < 1024 and head or nil
    if not at and not cut and #head == 1024 then
      v = redis.call('GET', k)
      local nl = string.find(v, '\n', 1, true)
      at = string.find(nl and string.sub(v, 1, nl - 1) or v, mark, 1, true)
    end
    if at then
      v = v or redis.call('GET', k)
      local nl = string.find(v, '\n', 1, true)
      local keep = q == '' or string.find(id, q, 1, true)
      if m ~= '' or not keep then
        if nl then
          local t = cjson.decode(string.sub(v, nl + 1))
          keep = (m == '' or t.method == m) and (keep or string.find(t.name, q, 1, true))
        else
          keep = false
        end
      end
      if keep then
        out[#out + 1] = v
        n = n + 1
      end
    end
    if n >= limit or seen >= cap then
      out[1], out[2] = top, tostring(off)
      return out
    end
  end
  if #r < 400 then return out end
end
"#;

/// Forgets results that expired (Redis deleted their keys by itself) and, beyond `ARGV[3]`
/// results, deletes the ones closest to expiry, at most `ARGV[4]` of them; answers how many
/// index entries went.
const TRIM_RESULTS: &str = r"
local p, now, keep, pass = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local z = p .. 'results'
local gone = redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
local n = redis.call('ZCARD', z)
if n > keep then
  local popped = redis.call('ZPOPMIN', z, math.min(n - keep, pass))
  for i = 1, #popped, 2 do
    redis.call('DEL', p .. 'result:' .. popped[i])
    gone = gone + 1
  end
end
return gone
";

/// Makes tasks this node's (`ARGV[2]`), waiting for the timer at their due time, and reports
/// them after a first entry. Recovery at start (`ARGV[3]` = ''): of the ids after `ARGV[4]`,
/// each that this node or a dead one owns (or none: a task of a release before nodes); a live
/// node's are left alone. Adoption (`ARGV[3]` a dead node): at most `ARGV[4]` of its tasks,
/// each leaving its set as it is taken (two adopters never take the same task), none if it is
/// alive again; the first entry says how many are left, and its registry entry goes with the
/// last. One script for both: one copy of `take` in the binary.
const RECOVER: &str = concat!(
    lua_prelude!(),
    r"
local dead, out, seen = ARGV[3], {'0'}, {}
if dead ~= '' then
  local v = redis.call('HGET', p .. 'nodes', dead)
  if v and alive(v) then return out end
  local set = p .. 'owned:' .. dead
  for _, id in ipairs(redis.call('SPOP', set, tonumber(ARGV[4]))) do
    local o = redis.call('HGET', p .. 'task:' .. id, 'node')
    if not o or o == dead then take(id, out) end
  end
  local left = redis.call('SCARD', set)
  if left == 0 then
    redis.call('HDEL', p .. 'nodes', dead)
    redis.call('DEL', p .. 'ready:' .. dead)
  end
  out[1] = tostring(left)
  return out
end
for i = 5, #ARGV do
  local id = ARGV[i]
  local o = redis.call('HGET', p .. 'task:' .. id, 'node')
  local theirs = false
  if o and o ~= me then
    if seen[o] == nil then
      local v = redis.call('HGET', p .. 'nodes', o)
      seen[o] = v and alive(v) or false
    end
    theirs = seen[o]
    if not theirs then redis.call('SREM', p .. 'owned:' .. o, id) end
  end
  if not theirs then take(id, out) end
end
return out
"
);

/// A pooled connection is checked with a `PING` when it is taken only if it has been idle this
/// long: one that is in use all the time costs no round trip of its own (a `PING` before every
/// call doubled the round trips of a claim), and one left idle across a Redis restart is still
/// replaced before it fails a call.
const CHECK_IDLE: Duration = Duration::from_secs(1);

/// Makes the pool's connections, and checks those idle for [`CHECK_IDLE`] or more.
struct Manager(Client);

/// A pooled connection and when it was last given back.
struct Pooled {
    conn: Connection,
    back: Instant,
}

impl std::ops::Deref for Pooled {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = Pooled;
    type Error = redis::RedisError;

    /// A new connection with socket timeouts.
    fn connect(&self) -> Result<Pooled, redis::RedisError> {
        let conn = self.0.get_connection_with_timeout(IO_TIMEOUT)?;
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        conn.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Pooled {
            conn,
            back: Instant::now(),
        })
    }

    fn is_valid(&self, c: &mut Pooled) -> Result<(), redis::RedisError> {
        if c.back.elapsed() >= CHECK_IDLE {
            redis::cmd("PING").query::<()>(&mut c.conn)?;
        }
        Ok(())
    }

    /// Called as a connection is given back: notes when, and drops one an error has broken.
    fn has_broken(&self, c: &mut Pooled) -> bool {
        c.back = Instant::now();
        !redis::ConnectionLike::is_open(&c.conn)
    }
}

/// One submit's tasks for `INSERT`: id, state, due time, task JSON, and whether a stored
/// result refuses it (a cron firing).
type Group = Vec<(String, &'static str, u64, String, bool)>;

/// One claim or free for `CLAIM`: the script's arguments for it.
struct Ask {
    /// The task's id.
    id: String,
    /// The running mark to store; empty to free the slot instead.
    data: Vec<u8>,
    /// The cc slot (worker) to take or free, if the task has cc.
    slot: Option<usize>,
    /// This claim's token: the same on a retry after a lost answer.
    token: u64,
}

/// The Redis store.
pub(crate) struct RedisStore {
    pool: r2d2::Pool<Manager>,
    /// For the connection of its own that `listen` subscribes on (not one of the pool's).
    client: Client,
    prefix: String,
    /// This node's id (`--node_id`): the owner of what it submits, takes and claims.
    node: String,
    /// Seconds without a heartbeat after which this node is dead (`--node_ttl`).
    node_ttl: u64,
    up: Arc<AtomicBool>,
    /// Set by `close`: the health thread ends.
    closed: Arc<AtomicBool>,
    scripts: Scripts,
    /// The workers' claims waiting to be sent together.
    claims: fold::Fold<Ask, i64>,
    /// The next claim's token (`CLAIM`), unique for this process (it starts at the clock).
    tokens: AtomicU64,
    /// Tokens of claims whose answer did not come (id → token): the claim's retry sends the
    /// same one, and wins if the lost call did.
    uncertain: Mutex<HashMap<String, u64>>,
}

#[derive(Clone)]
struct Scripts {
    insert: Script,
    record: Script,
    take_due_many: Script,
    claim: Script,
    cancel: Script,
    revive: Script,
    list_live: Script,
    list_done: Script,
    recover: Script,
    trim_results: Script,
    beat: Script,
    steal: Script,
}

fn down(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

fn state_name(s: State) -> &'static str {
    match s {
        State::Delayed => "delayed",
        State::Ready => "ready",
        State::Running => "running",
        State::RetryWait => "retry_wait",
    }
}

fn parse_state(s: &str) -> Option<State> {
    match s {
        "delayed" => Some(State::Delayed),
        "ready" => Some(State::Ready),
        "running" => Some(State::Running),
        "retry_wait" => Some(State::RetryWait),
        _ => None,
    }
}

/// The URL without its password, for messages: the user part (`redis://:pw@host`) and a socket
/// URL's `pass=` (`redis+unix:///run/redis.sock?pass=pw`) become `***`.
pub fn redacted(url: &str) -> String {
    let url = match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    };
    let Some((base, query)) = url.split_once('?') else {
        return url;
    };
    let query: Vec<&str> = query
        .split('&')
        .map(|kv| {
            if kv.starts_with("pass=") {
                "pass=***"
            } else {
                kv
            }
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

impl RedisStore {
    /// Connects (waiting up to `wait` for Redis to come up) and starts the insert and health
    /// threads; `node` and `node_ttl` name this node among those sharing the prefix.
    pub(crate) fn open(
        url: &str,
        prefix: &str,
        node: &str,
        node_ttl: u64,
        wait: Duration,
    ) -> Result<RedisStore, StoreError> {
        let client = Client::open(url).map_err(|e| {
            StoreError::Unavailable(format!("bad Redis URL {}: {e}", redacted(url)))
        })?;
        let pool = r2d2::Pool::builder()
            .max_size(32)
            .min_idle(Some(1))
            .connection_timeout(Duration::from_secs(2))
            // Outages are logged once by the health thread, not once per failed connect.
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(Manager(client.clone()));
        let end = Instant::now() + wait;
        loop {
            // The pool's or Redis's own words, without this store's "unavailable" prefix: the
            // caller names the flag, this line says the rest once.
            let pinged = pool.get().map_err(|e| e.to_string()).and_then(|mut c| {
                redis::cmd("PING")
                    .query::<String>(&mut c.conn)
                    .map_err(|e| e.to_string())
            });
            match pinged {
                Ok(_) => break,
                Err(e) if Instant::now() >= end => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot reach Redis at {} (tried for {wait:?}): {e}",
                        redacted(url)
                    )))
                }
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
        let scripts = Scripts {
            insert: Script::new(INSERT),
            record: Script::new(RECORD),
            take_due_many: Script::new(TAKE_DUE_MANY),
            claim: Script::new(CLAIM),
            cancel: Script::new(CANCEL),
            revive: Script::new(REVIVE),
            list_live: Script::new(LIST_LIVE),
            list_done: Script::new(LIST_DONE),
            recover: Script::new(RECOVER),
            trim_results: Script::new(TRIM_RESULTS),
            beat: Script::new(nodes::BEAT),
            steal: Script::new(steal::STEAL),
        };
        let up = Arc::new(AtomicBool::new(true));
        let closed = Arc::new(AtomicBool::new(false));
        {
            let (pool, up, closed) = (pool.clone(), up.clone(), closed.clone());
            thread::Builder::new()
                .name("redis-health".into())
                .spawn(move || {
                    while !closed.load(Ordering::Acquire) {
                        let ok = pool
                            .get()
                            .ok()
                            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut *c).ok())
                            .is_some();
                        note_health(&up, ok);
                        thread::sleep(Duration::from_secs(1));
                    }
                })
                .map_err(down)?;
        }
        Ok(RedisStore {
            pool,
            client,
            prefix: prefix.to_string(),
            node: node.to_string(),
            node_ttl,
            up,
            closed,
            scripts,
            claims: fold::Fold::new("CLAIM", MAX_CLAIMS),
            tokens: AtomicU64::new(crate::clock::now_us()),
            uncertain: Mutex::new(HashMap::new()),
        })
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<Manager>, StoreError> {
        self.pool.get().map_err(|e| {
            self.up.store(false, Ordering::Relaxed);
            down(e)
        })
    }

    /// Runs `f` on a pooled connection, noting whether Redis answered.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut c = self.conn()?;
        match f(&mut c) {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.up.store(false, Ordering::Relaxed);
                }
                Err(down(e))
            }
        }
    }

    /// The stored record of a finished task (its result, then its task).
    fn stored_result(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| redis::cmd("GET").arg(self.key("result", id)).query(c))
    }

    /// The stored JSON of unfinished task `id`, if there is one.
    fn task_data(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            redis::cmd("HGET")
                .arg(self.key("task", id))
                .arg("data")
                .query(c)
        })
    }

    /// Runs `CLAIM` for `task`, with the claims of other workers waiting at the same moment
    /// (`fold::Fold`), taking cc slot `slot` too when given (with a lease of
    /// `--node_ttl`); not `claim`: frees that slot if `task`'s attempt still holds it.
    fn claim_call(&self, task: &Task, slot: Option<usize>, claim: bool) -> Result<i64, StoreError> {
        let data = if claim {
            super::running_json(task)?
        } else {
            Vec::new()
        };
        // A claim's retry after a lost answer sends the same token again; a free has none.
        let token = if claim {
            let again = self.uncertain.lock().remove(&task.id);
            again.unwrap_or_else(|| self.tokens.fetch_add(1, Ordering::Relaxed))
        } else {
            0
        };
        let ask = Ask {
            id: task.id.clone(),
            data,
            slot,
            token,
        };
        let r = self.claims.ask(ask, |asks| self.run_claims(asks));
        if claim && r.is_err() {
            let mut u = self.uncertain.lock();
            if u.len() >= MAX_UNCERTAIN {
                u.clear();
            }
            u.insert(task.id.clone(), token);
        }
        r
    }

    /// One `CLAIM` call for `asks`.
    fn run_claims(&self, asks: &[&Ask]) -> Result<Vec<i64>, StoreError> {
        let mut call = self.scripts.claim.arg(&self.prefix);
        call.arg(&self.node);
        let lease = self.node_ttl * 1000;
        for a in asks {
            call.arg(&a.id).arg(a.data.as_slice());
            match a.slot {
                Some(w) => call.arg(w).arg(lease),
                None => call.arg("").arg(""),
            };
            call.arg(a.token);
        }
        self.with(|c| call.invoke(c))
    }

    /// One `INSERT` call for the submits `groups`: per group, "" or the duplicate id.
    fn run_inserts(&self, groups: &[&Group]) -> Result<Vec<String>, StoreError> {
        let mut inv = self.scripts.insert.prepare_invoke();
        inv.arg(&self.prefix).arg(&self.node).arg(groups.len());
        for g in groups {
            inv.arg(g.len());
            for (id, state, due, data, once) in g.iter() {
                inv.arg(id)
                    .arg(*state)
                    .arg(*due)
                    .arg(data)
                    .arg(if *once { "1" } else { "0" });
            }
        }
        self.with(|c| inv.invoke(c))
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.prefix)
    }
}

/// Notes what the health thread's ping found; logs only a change, not every ping.
fn note_health(up: &AtomicBool, ok: bool) {
    if up.swap(ok, Ordering::Relaxed) != ok {
        if ok {
            log::info!("store: Redis is reachable again");
        } else {
            log::error!("store: Redis is unreachable");
        }
    }
}

/// The tasks a script's `take` reported (id, due, former state: three entries each).
fn recovered(flat: &[String], out: &mut Vec<Recovered>) {
    for t in flat.chunks(3) {
        if let [id, due, state] = t {
            out.push(Recovered {
                id: Arc::from(id.as_str()),
                due_us: due.parse().unwrap_or(0),
                was_running: state == "running",
            });
        }
    }
}

/// A task record taken off the due set, marked ready.
fn ready_task(data: &str) -> Result<Task, StoreError> {
    let mut t: Task = decode(data)?;
    t.state = State::Ready;
    Ok(t)
}

/// What `INSERT` needs of each task of one submission.
fn group(tasks: &[Task]) -> Result<Group, StoreError> {
    tasks
        .iter()
        .map(|t| {
            Ok((
                t.id.clone(),
                state_name(t.state),
                t.due_us,
                encode(t)?,
                t.trusted,
            ))
        })
        .collect()
}

/// `INSERT`'s answer for one submission: "" when inserted, else the id already taken.
fn duplicate(id: String) -> Result<(), StoreError> {
    if id.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Duplicate(id))
    }
}

/// A stored JSON record (task or result); unreadable is `Corrupt`.
fn decode<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_slice(s.as_bytes()).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl Store for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    /// The batches go in `INSERT` calls of their own, at most `MAX_GROUPS` each. The HTTP
    /// loop thread gives the submits of many clients at once, and a WebSocket frame's tasks
    /// come together: folding the inserts of several threads into one call, as the claims are,
    /// no longer paid for its code.
    fn insert_many(&self, batches: &[&[Task]]) -> Vec<Result<(), StoreError>> {
        let mut answers: Vec<Result<(), StoreError>> = Vec::with_capacity(batches.len());
        let mut groups: Vec<Group> = Vec::with_capacity(batches.len());
        // Where each group's answer goes.
        let mut places: Vec<usize> = Vec::with_capacity(batches.len());
        for b in batches {
            match group(b) {
                Ok(g) => {
                    places.push(answers.len());
                    groups.push(g);
                    answers.push(Ok(()));
                }
                Err(e) => answers.push(Err(e)),
            }
        }
        let t0 = std::time::Instant::now();
        for (chunk, places) in groups.chunks(MAX_GROUPS).zip(places.chunks(MAX_GROUPS)) {
            let refs: Vec<&Group> = chunk.iter().collect();
            let called = self.run_inserts(&refs).and_then(|dups| {
                if dups.len() == refs.len() {
                    Ok(dups)
                } else {
                    Err(StoreError::Unavailable(format!(
                        "INSERT answered {} results for {} submissions",
                        dups.len(),
                        refs.len()
                    )))
                }
            });
            for (k, &at) in places.iter().enumerate() {
                answers[at] = match &called {
                    Ok(dups) => duplicate(dups[k].clone()),
                    Err(e) => Err(e.clone()),
                };
            }
        }
        crate::metrics::STORE_COMMIT.since(t0);
        answers
    }

    fn take_due_many(&self, due: &[Due], again: bool) -> Vec<Result<Option<Task>, StoreError>> {
        let data: Result<Vec<Option<String>>, StoreError> = self.with(|c| {
            let mut inv = self.scripts.take_due_many.prepare_invoke();
            inv.arg(&self.prefix)
                .arg(&self.node)
                .arg(if again { "1" } else { "0" });
            for (id, due_us) in due {
                inv.arg(&**id).arg(due_us);
            }
            inv.invoke(c)
        });
        match data {
            Ok(data) if data.len() == due.len() => data
                .into_iter()
                .map(|d| d.map(|d| ready_task(&d)).transpose())
                .collect(),
            Ok(data) => {
                let e = StoreError::Corrupt(format!(
                    "take_due_many answered {} entries for {} ids",
                    data.len(),
                    due.len()
                ));
                due.iter().map(|_| Err(e.clone())).collect()
            }
            Err(e) => due.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    fn claim(&self, task: &Task) -> Result<bool, StoreError> {
        Ok(self.claim_call(task, None, true)? == 1)
    }

    fn claim_on(&self, task: &Task, worker: usize) -> Result<Claim, StoreError> {
        if task.cc.is_empty() {
            return Ok(if self.claim(task)? {
                Claim::Won
            } else {
                Claim::Lost
            });
        }
        Ok(match self.claim_call(task, Some(worker), true)? {
            1 => Claim::Won,
            2 => Claim::Busy,
            _ => Claim::Lost,
        })
    }

    fn release(&self, task: &Task, worker: usize) {
        if task.cc.is_empty() {
            return;
        }
        // A free that fails (Redis down, logged by the health thread) leaves the slot to its
        // lease.
        let _ = self.claim_call(task, Some(worker), false);
    }

    fn record(&self, changes: &[Change]) -> Result<(), StoreError> {
        let mut inv = self.scripts.record.prepare_invoke();
        inv.arg(&self.prefix).arg(&self.node);
        let now = crate::clock::now_ms();
        for ch in changes {
            let (kind, t) = match ch {
                Change::Retry(t) => ("r", t),
                Change::Insert(t) => ("i", t),
                Change::Finish {
                    result,
                    expires_ms,
                    task,
                } => {
                    let ttl = (expires_ms - now).max(1);
                    let record = list::encode_record(result, task.as_ref())?;
                    inv.arg("f")
                        .arg(&result.id)
                        .arg(record)
                        .arg(ttl)
                        .arg(*expires_ms);
                    continue;
                }
            };
            inv.arg(kind)
                .arg(&t.id)
                .arg(state_name(t.state))
                .arg(t.due_us)
                .arg(encode(t)?);
        }
        let t0 = std::time::Instant::now();
        let res = self.with(|c| inv.invoke::<i64>(c)).map(drop);
        crate::metrics::STORE_COMMIT.since(t0);
        res
    }

    fn cancel(&self, id: &str, expires_ms: i64) -> Result<Cancel, StoreError> {
        // The result is made from the record read first; the script stores it only if the
        // record has not changed since (an attempt may have run in between).
        for _ in 0..CANCEL_TRIES {
            let (data, made) = match self.task_data(id)? {
                Some(data) => {
                    let task: Task = decode(&data)?;
                    let result = TaskResult::cancelled(&task, crate::clock::now_ms());
                    let json = list::encode_record(&result, Some(&task))?;
                    (data, Some((result, task.kafka, json)))
                }
                None => (String::new(), None),
            };
            let json = made.as_ref().map_or(&[][..], |m| m.2.as_slice());
            let ttl = (expires_ms - crate::clock::now_ms()).max(1);
            let answer: String = self.with(|c| {
                self.scripts
                    .cancel
                    .arg(&self.prefix)
                    .arg(id)
                    .arg(&data)
                    .arg(json)
                    .arg(expires_ms)
                    .arg(ttl)
                    .arg(&self.node)
                    .invoke(c)
            })?;
            return Ok(match (answer.as_str(), made) {
                ("cancelled", Some((result, kafka, _))) => Cancel::Cancelled {
                    result: Box::new(result),
                    kafka,
                },
                ("changed", _) => continue,
                ("running", _) => Cancel::Running,
                ("finished", _) => Cancel::Finished,
                _ => Cancel::Unknown,
            });
        }
        Err(StoreError::Unavailable(format!(
            "task {id} changed {CANCEL_TRIES} times while being cancelled; try again"
        )))
    }

    fn status(&self, id: &str) -> Result<Option<State>, StoreError> {
        let s: Option<String> = self.with(|c| {
            redis::cmd("HGET")
                .arg(self.key("task", id))
                .arg("state")
                .query(c)
        })?;
        Ok(s.as_deref().and_then(parse_state))
    }

    fn result(&self, id: &str) -> Result<Option<TaskResult>, StoreError> {
        let s = self.stored_result(id)?;
        s.as_deref()
            .map(|s| list::decode_result(s.as_bytes()))
            .transpose()
    }

    fn list(&self, q: &ListQuery) -> Result<Page, StoreError> {
        // The scan and the filters run in Redis, in one call: one round trip a page.
        let (script, want, start) = match q.what {
            Listed::Live(s) => (&self.scripts.list_live, state_name(s), "0"),
            Listed::Final(s) => (&self.scripts.list_done, s.as_str(), ""),
        };
        // Live: the id the previous page ended at; finished: the offset among equal expiries.
        let (from, skip) = match &q.after {
            Some(c) => (c.n.to_string(), c.text.as_str()),
            None => (start.to_string(), ""),
        };
        let out: Vec<String> = self.with(|c| {
            script
                .arg(&self.prefix)
                .arg(want)
                .arg(&from)
                .arg(skip)
                .arg(q.scan)
                .arg(q.limit)
                .arg(q.method.map_or("", |m| m.as_str()))
                .arg(&q.q)
                .invoke(c)
        })?;
        let mut rows = Vec::new();
        for v in out.iter().skip(2) {
            match q.what {
                Listed::Live(s) => list::take_live(q, s, v.as_bytes(), &mut rows),
                Listed::Final(_) => list::take_finished(q, v.as_bytes(), &mut rows),
            };
        }
        let next = match out.first().map(String::as_str) {
            None | Some("") => None,
            Some(n) => Some(Cursor {
                n: n.parse().unwrap_or(0),
                text: out.get(1).cloned().unwrap_or_default(),
            }),
        };
        Ok(Page { rows, next })
    }

    fn lookup(&self, id: &str) -> Result<Option<Record>, StoreError> {
        if let Some(state) = self.status(id)? {
            return Ok(Some(Record {
                state: state.as_str(),
                task: self.task_data(id)?.as_deref().map(decode).transpose()?,
                result: None,
            }));
        }
        let Some(v) = self.stored_result(id)? else {
            return Ok(None);
        };
        let result = list::decode_result(v.as_bytes())?;
        Ok(Some(Record {
            state: result.status.as_str(),
            task: list::decode_task(v.as_bytes())?,
            result: Some(result),
        }))
    }

    fn revive(&self, id: &str, now_us: u64) -> Result<Revive, StoreError> {
        // Decided on the result read first; the script writes only if it has not changed since.
        for _ in 0..CANCEL_TRIES {
            if let Some(s) = self.status(id)? {
                return Ok(Revive::NotDead(s.as_str()));
            }
            let Some(v) = self.stored_result(id)? else {
                return Ok(Revive::Unknown);
            };
            let task = match list::revive_from(v.as_bytes(), now_us)? {
                Revive::Revived(t) => t,
                other => return Ok(other),
            };
            let data = encode(&task)?;
            let answer: String = self.with(|c| {
                self.scripts
                    .revive
                    .arg(&self.prefix)
                    .arg(id)
                    .arg(&v)
                    .arg(task.due_us)
                    .arg(&data)
                    .arg(&self.node)
                    .invoke(c)
            })?;
            if answer == "ok" {
                return Ok(Revive::Revived(task));
            }
        }
        Err(StoreError::Unavailable(format!(
            "task {id} changed {CANCEL_TRIES} times while being retried; try again"
        )))
    }

    fn recover(&self) -> Result<Vec<Recovered>, StoreError> {
        let ids: Vec<String> = self.with(|c| {
            redis::cmd("SMEMBERS")
                .arg(format!("{}live", self.prefix))
                .query(c)
        })?;
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(1000) {
            let flat: Vec<String> = self.with(|c| {
                let mut inv = self.scripts.recover.prepare_invoke();
                inv.arg(&self.prefix).arg(&self.node).arg("").arg(0);
                for id in chunk {
                    inv.arg(id);
                }
                inv.invoke(c)
            })?;
            recovered(flat.get(1..).unwrap_or_default(), &mut out);
        }
        Ok(out)
    }

    fn summary(&self, cap: usize) -> Result<Summary, StoreError> {
        let p = &self.prefix;
        let (waiting, waiting_total, running_total, live_total): (
            Vec<String>,
            usize,
            usize,
            usize,
        ) = self.with(|c| {
            redis::pipe()
                .cmd("ZRANGE")
                .arg(format!("{p}due"))
                .arg(0)
                .arg(cap as i64 - 1)
                .cmd("ZCARD")
                .arg(format!("{p}due"))
                .cmd("HLEN")
                .arg(format!("{p}running"))
                .cmd("SCARD")
                .arg(format!("{p}live"))
                .query(c)
        })?;
        // At most one entry per worker of the live nodes: all of them, then the first `cap`.
        let mut running: Vec<String> =
            self.with(|c| redis::cmd("HKEYS").arg(format!("{p}running")).query(c))?;
        running.sort_unstable();
        running.truncate(cap);
        Ok(Summary {
            running,
            running_total,
            waiting,
            waiting_total,
            // The due set holds both kinds: telling them apart would read every task.
            retry_wait_total: None,
            ready_total: live_total.saturating_sub(waiting_total + running_total),
        })
    }

    fn gc(&self, now_ms: i64, keep: usize) -> Result<usize, StoreError> {
        // Redis deletes expired results by itself (PEXPIRE); the index of results is trimmed
        // here, with the results beyond `keep`.
        self.with(|c| {
            self.scripts
                .trim_results
                .arg(&self.prefix)
                .arg(now_ms)
                .arg(keep)
                .arg(super::GC_PASS)
                .invoke(c)
        })
    }

    fn results_stored(&self) -> Result<usize, StoreError> {
        self.with(|c| {
            redis::cmd("ZCARD")
                .arg(format!("{}results", self.prefix))
                .query(c)
        })
    }

    fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| redis::cmd("GET").arg(self.key("meta", key)).query(c))
    }

    fn put_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.with(|c| {
            redis::cmd("SET")
                .arg(self.key("meta", key))
                .arg(value)
                .query(c)
        })
    }

    fn healthy(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract;
    use std::process::{Child, Command, Stdio};

    /// A private redis-server on a free port, stopped when dropped.
    pub(super) struct Server(Child, u16);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port")
    }

    pub(super) fn redis_server() -> Server {
        redis_server_on(free_port())
    }

    fn redis_server_on(port: u16) -> Server {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server is needed ({e}): run scripts/test.sh, which installs it")
            });
        Server(child, port)
    }

    fn store(s: &Server) -> RedisStore {
        node_store(s, "n1")
    }

    /// A store of node `node` (ttl 3 s) on `s`.
    pub(super) fn node_store(s: &Server, node: &str) -> RedisStore {
        RedisStore::open(&url(s.1), "t:", node, 3, Duration::from_secs(10)).expect("connect")
    }

    /// `node_store`, joined with `workers` workers.
    pub(super) fn joined(s: &Server, node: &str, workers: usize) -> RedisStore {
        use crate::node::{Join, Registry};
        let st = node_store(s, node);
        assert_eq!(st.join(workers, "").expect("join"), Join::Joined);
        st
    }

    fn url(port: u16) -> String {
        format!("redis://127.0.0.1:{port}/0")
    }

    /// Sends `sig` to the redis-server.
    fn signal(s: &Server, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(s.0.id()).expect("pid");
        // SAFETY: kill(2) on a child process this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    }

    /// Polls `cond` until it holds, failing with `what` after `limit`.
    fn wait_until(limit: Duration, what: &str, cond: impl Fn() -> bool) {
        let end = Instant::now() + limit;
        while !cond() {
            assert!(Instant::now() < end, "{what}: not seen within {limit:?}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Live listings page through `SSCAN` batches: a task of an earlier page that finishes
    /// (or is cancelled) between two pages must not make a later one be skipped.
    #[test]
    fn paging_does_not_skip_a_task_when_another_leaves() {
        use crate::store::list::{ListQuery, Listed};
        let s = redis_server();
        let st = store(&s);
        let ids: Vec<String> = (0..10).map(|i| format!("d{i}")).collect();
        let tasks: Vec<Task> = ids
            .iter()
            .map(|id| contract::task(id, State::Delayed, 5))
            .collect();
        st.insert(&tasks).expect("insert");
        let mut q = ListQuery {
            what: Listed::Live(State::Delayed),
            method: None,
            q: String::new(),
            limit: 3,
            after: None,
            scan: 10_000,
        };
        let first = st.list(&q).expect("list");
        let mut seen: Vec<String> = first.rows.iter().map(|r| r.id.clone()).collect();
        let gone = seen[1].clone();
        let cancelled = st.cancel(&gone, crate::clock::now_ms() + 60_000);
        assert!(
            matches!(cancelled, Ok(Cancel::Cancelled { .. })),
            "{cancelled:?}"
        );
        q.after = first.next;
        while q.after.is_some() {
            let page = st.list(&q).expect("list");
            seen.extend(page.rows.iter().map(|r| r.id.clone()));
            q.after = page.next;
        }
        let missed: Vec<&String> = ids
            .iter()
            .filter(|id| **id != gone && !seen.contains(id))
            .collect();
        assert!(
            missed.is_empty(),
            "never listed though delayed throughout: {missed:?}"
        );
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), seen.len(), "listed twice: {seen:?}");
    }

    #[test]
    fn redis_store_meets_the_contract() {
        let s = redis_server();
        contract::run(&store(&s));
        contract::expiry(&store(&s), false);
        let s = redis_server();
        contract::summary_counts(&store(&s));
        let s = redis_server();
        contract::browse(&store(&s));
        let s = redis_server();
        contract::cc_claims(&store(&s));
        let s = redis_server();
        contract::insert_many(&store(&s));
    }

    #[test]
    fn redis_store_keeps_at_most_result_max_results() {
        let s = redis_server();
        contract::result_cap(&store(&s));
    }

    #[test]
    fn recovery_hands_every_unfinished_task_back() {
        let s = redis_server();
        let st = store(&s);
        st.insert(&[
            contract::task("r", State::Ready, 1),
            contract::task("d", State::Delayed, 99),
        ])
        .expect("insert");
        assert!(st
            .claim(&contract::task("r", State::Ready, 1))
            .expect("claim"));
        drop(st);
        let st = store(&s);
        let mut rec = st.recover().expect("recover");
        rec.sort_by(|a, b| a.id.cmp(&b.id));
        let got: Vec<(&str, u64, bool)> = rec
            .iter()
            .map(|r| (&*r.id, r.due_us, r.was_running))
            .collect();
        assert_eq!(got, vec![("d", 99, false), ("r", 1, true)]);
        assert!(st.take_due("r", 1).expect("take").is_some());
        assert!(
            st.take_due("r", 1).expect("take").is_none(),
            "handed out once"
        );
        assert_eq!(
            st.summary(10).expect("summary").waiting,
            vec!["d".to_string()]
        );
    }

    #[test]
    fn submissions_given_together_share_round_trips_but_keep_their_own_answers() {
        let s = redis_server();
        let st = store(&s);
        // Every fifth submission repeats the id of the one before it: refused alone.
        let n = 1100;
        let tasks: Vec<Task> = (0..n)
            .map(|j| {
                let id = if j % 5 == 4 { j - 1 } else { j };
                contract::task(&format!("t{id}"), State::Ready, 0)
            })
            .collect();
        let batches: Vec<&[Task]> = tasks.iter().map(std::slice::from_ref).collect();
        let answers = st.insert_many(&batches);
        for (j, a) in answers.iter().enumerate() {
            if j % 5 == 4 {
                assert_eq!(a, &Err(StoreError::Duplicate(format!("t{}", j - 1))), "{j}");
            } else {
                assert_eq!(a, &Ok(()), "{j}");
            }
        }
        assert_eq!(answers.len(), n);
        assert_eq!(st.summary(0).expect("summary").ready_total, n / 5 * 4);
        // The insert script is the only one this test runs.
        let info: String = st
            .with(|c| redis::cmd("INFO").arg("commandstats").query(c))
            .expect("INFO");
        let calls: u64 = info
            .lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        // Three calls of at most 512 (and the script's first load, when its hash was unknown).
        assert!(
            (3..=5).contains(&calls),
            "{calls} script calls for {n} submissions of at most {MAX_GROUPS} each\n{info}"
        );
    }

    #[test]
    fn unreachable_redis_fails_clearly() {
        let e = RedisStore::open(
            "redis://:secret@127.0.0.1:1/0",
            "t:",
            "n1",
            15,
            Duration::from_millis(300),
        )
        .err()
        .expect("no server there")
        .to_string();
        assert!(
            e.contains("cannot reach Redis at redis://***@127.0.0.1:1/0"),
            "{e}"
        );
        assert!(!e.contains("secret"));
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redacted("redis://:pw@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(redacted("redis://:p@ss@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(redacted("redis://h:6379"), "redis://h:6379");
        // An '@' only before the scheme's "://" is no password: the text is kept as it is.
        assert_eq!(redacted("a@b://h:6379"), "a@b://h:6379");
        assert_eq!(
            redacted("redis+unix:///run/r.sock?db=1&pass=pw&user=u"),
            "redis+unix:///run/r.sock?db=1&pass=***&user=u"
        );
        assert_eq!(
            redacted("redis+unix:///run/r.sock?pass=pw"),
            "redis+unix:///run/r.sock?pass=***"
        );
    }

    /// The store's name in `/sys_info` and the logs.
    #[test]
    fn the_store_is_named_redis() {
        let s = redis_server();
        assert_eq!(store(&s).name(), "redis");
    }

    /// At start-up the store waits for a Redis that is not up yet (README: poulpe waits up to
    /// 5 s for Redis); here Redis starts about 3 s after the first try, so after that try has
    /// given up (it waits 2 s for a connection).
    #[test]
    fn open_waits_for_a_redis_that_comes_up_late() {
        let port = free_port();
        let late = thread::spawn(move || {
            thread::sleep(Duration::from_secs(3));
            redis_server_on(port)
        });
        let st = RedisStore::open(&url(port), "t:", "n1", 15, Duration::from_secs(20));
        let _s = late.join().expect("join");
        let st = st.unwrap_or_else(|e| panic!("Redis came up about 3 s after the start: {e}"));
        st.insert(&[contract::task("late", State::Ready, 0)])
            .expect("insert");
    }

    /// A Redis that stops answering (SIGSTOP: its socket still accepts, nothing comes back)
    /// makes a call fail with `Unavailable` once the socket timeouts run out (README: 3 s),
    /// instead of holding the caller until Redis answers again.
    #[test]
    fn a_redis_that_stops_answering_fails_calls_instead_of_hanging() {
        let s = redis_server();
        let st = Arc::new(store(&s));
        st.insert(&[contract::task("h", State::Ready, 0)])
            .expect("insert");
        signal(&s, libc::SIGSTOP);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let st2 = st.clone();
        thread::spawn(move || {
            let _ = tx.send(st2.status("h"));
        });
        // A generous deadline: the timeouts are 3 s for the check and 2 s for a new connection.
        let got = rx.recv_timeout(Duration::from_secs(30));
        signal(&s, libc::SIGCONT);
        match got {
            Ok(Err(StoreError::Unavailable(_))) => {}
            Ok(other) => panic!("a Redis that answers nothing: {other:?}"),
            Err(_) => panic!("a call to a Redis that answers nothing still waits after 30 s"),
        }
    }

    /// `healthy` (shown in `/sys_info`) turns false when Redis goes away, by the health thread
    /// alone (no call fails here), and true again once Redis is back on its port.
    #[test]
    fn health_follows_redis_going_away_and_coming_back() {
        let port = free_port();
        let s = redis_server_on(port);
        let st =
            RedisStore::open(&url(port), "t:", "n1", 15, Duration::from_secs(10)).expect("connect");
        assert!(st.healthy(), "up once open");
        drop(s);
        wait_until(Duration::from_secs(20), "reported down", || !st.healthy());
        let _s = redis_server_on(port);
        wait_until(Duration::from_secs(30), "reported up again", || {
            st.healthy()
        });
        st.close();
    }

    /// PINGs Redis has answered so far (its own count, read on a connection of this test's).
    fn pings(s: &Server) -> u64 {
        let mut c = Client::open(url(s.1))
            .and_then(|c| c.get_connection())
            .expect("connect");
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut c)
            .expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_ping:calls="))
            .and_then(|l| l.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// A claim whose answer was lost (Redis ran it, the reply timed out) is won by its retry,
    /// which sends the same token; another claim of the task, with another token, loses. A
    /// worker whose claim failed is given its task again after a second: without this, the
    /// retry found the task running and dropped it, and it waited for the node's restart.
    #[test]
    fn a_claim_retried_after_a_lost_answer_wins_and_no_other_does() {
        let s = redis_server();
        let st = node_store(&s, "a");
        let t = contract::task("t", State::Ready, 1);
        st.insert(std::slice::from_ref(&t)).expect("insert");
        let ask = |token: u64| Ask {
            id: t.id.clone(),
            data: crate::store::running_json(&t).expect("mark"),
            slot: None,
            token,
        };
        let run = |token: u64| st.run_claims(&[&ask(token)]).expect("claim");
        assert_eq!(run(7), [1], "the lost call: it made the task running");
        assert_eq!(run(7), [1], "its retry, same token: won");
        assert_eq!(run(8), [0], "another claim: lost");
        // Through the store: a token remembered for `t` is the one its next claim sends.
        st.uncertain.lock().insert("t".into(), 7);
        assert!(st.claim(&t).expect("claim"), "the retry of claim 7 wins");
        assert!(st.uncertain.lock().is_empty(), "used once");
        assert!(!st.claim(&t).expect("claim"), "a new claim loses");
    }

    /// A ready task of a release before nodes (no `node` field, in no `owned` set) becomes the
    /// claiming node's: it joins that node's `owned` set, so that the node's death hands it
    /// back. A task the node already owns is not added again (it is in its set since insert).
    #[test]
    fn a_claimed_task_without_an_owner_joins_the_claimers_owned_set() {
        let s = redis_server();
        let st = node_store(&s, "a");
        let t = contract::task("old", State::Ready, 1);
        st.insert(std::slice::from_ref(&t)).expect("insert");
        let members = || -> Vec<String> {
            st.with(|c| redis::cmd("SMEMBERS").arg(st.key("owned", "a")).query(c))
                .expect("owned")
        };
        assert_eq!(members(), ["old"], "owned since insert");
        // As a release before nodes left it: no owner, in no owned set.
        st.with(|c| {
            redis::pipe()
                .cmd("HDEL")
                .arg(st.key("task", "old"))
                .arg("node")
                .cmd("SREM")
                .arg(st.key("owned", "a"))
                .arg("old")
                .query::<()>(c)
        })
        .expect("make it ownerless");
        assert!(members().is_empty());
        assert!(
            st.claim(&t).expect("claim"),
            "an ownerless ready task is claimed"
        );
        assert_eq!(members(), ["old"], "and becomes the claimer's");
        let owner: Option<String> = st
            .with(|c| {
                redis::cmd("HGET")
                    .arg(st.key("task", "old"))
                    .arg("node")
                    .query(c)
            })
            .expect("owner");
        assert_eq!(owner.as_deref(), Some("a"));
    }

    /// A pooled connection taken again and again is not checked with a PING each time (that
    /// doubled the round trips of every claim); one idle across a Redis restart is checked
    /// and replaced, so the first call after the restart does not fail on it.
    #[test]
    fn pooled_connections_are_checked_only_after_being_idle() {
        let port = free_port();
        let s = redis_server_on(port);
        let st = store(&s);
        let before = pings(&s);
        for _ in 0..200 {
            st.status("nope").expect("status");
        }
        // The health thread pings once a second on its own.
        let busy = pings(&s) - before;
        assert!(busy <= 3, "{busy} PINGs for 200 calls in a row");
        drop(s);
        let s = redis_server_on(port);
        wait_until(Duration::from_secs(10), "redis-server back", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        std::thread::sleep(CHECK_IDLE);
        for i in 0..3 {
            assert!(st.status("nope").is_ok(), "call {i} after the restart");
        }
        drop(s);
        st.close();
    }

    /// The health thread logs a change of health once, not every ping.
    #[test]
    fn health_changes_are_logged_once_each() {
        use crate::store::memory::tests::capture;
        capture::install();
        let up = AtomicBool::new(true);
        for ok in [true, true, false, false, false, true, true] {
            note_health(&up, ok);
        }
        let lines: Vec<String> = capture::mine()
            .into_iter()
            .filter(|l| l.contains("Redis"))
            .collect();
        assert_eq!(
            lines,
            vec![
                "store: Redis is unreachable".to_string(),
                "store: Redis is reachable again".to_string()
            ]
        );
        assert!(up.load(Ordering::Relaxed));
    }
}

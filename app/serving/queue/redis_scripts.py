"""The Lua scripts the Redis queue and job store run: each check-and-write is one script, so that it is
atomic in Redis (docs/ARCHITECTURE.md, "Many replicas as one service", has the keys and their states).

Scripts name every key they touch in KEYS, except the retention sweep, which drops a finished job's
keys by name from its prefix (a single Redis, not a cluster).
"""

from __future__ import annotations

# ---- the queue ----------------------------------------------------------------------------------------

# Refuse when the service-wide bound is reached (returns nil), else record the request and add it to
# the stream (`entry` is its stream id). KEYS: waiting, queue, work. ARGV: bound, id, request, images,
# enqueued, deadline, keep seconds.
_PUT_CHECK = """
local waiting = tonumber(redis.call('GET', KEYS[1]) or '0')
if waiting >= tonumber(ARGV[1]) then return false end
"""
_PUT_ADD = """
redis.call('INCR', KEYS[1])
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[2])
redis.call('HSET', KEYS[3], 'state', 'queued', 'entry', entry, 'request', ARGV[3], 'images', ARGV[4],
           'enqueued', ARGV[5], 'deadline', ARGV[6], 'token', '0', 'deliveries', '0')
redis.call('EXPIRE', KEYS[3], ARGV[7])
"""
PUT = _PUT_CHECK + _PUT_ADD + "return entry\n"

# A job: the same, plus its record, its place in the listing and its Idempotency-Key, all or nothing.
# An Idempotency-Key already taken returns 'known:<id>' and adds nothing. Extra KEYS: 4 job, 5 listing,
# 6 seq counter, 7 idempotency key (the job key again when none), 8 counts by status. Extra ARGV:
# 8 record, 9 '1' when a key is given, 10 keep seconds of the record, 11 tenant.
PUT_JOB = """
if ARGV[9] == '1' then
  local known = redis.call('GET', KEYS[7])
  if known then return 'known:' .. known end
end
""" + _PUT_CHECK + _PUT_ADD + """
redis.call('HSET', KEYS[3], 'job', '1')
local seq = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[4], 'record', ARGV[8], 'status', 'queued', 'seq', seq, 'tenant', ARGV[11])
redis.call('EXPIRE', KEYS[4], ARGV[10])
redis.call('ZADD', KEYS[5], seq, ARGV[2])
if ARGV[9] == '1' then redis.call('SET', KEYS[7], ARGV[2], 'EX', ARGV[10]) end
redis.call('HINCRBY', KEYS[8], 'queued', 1)
return entry
"""

# A delivered entry becomes running under a new token; a cancelled or finished one is dropped.
# KEYS: work, queue, waiting. ARGV: entry, consumer, group.
CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' then redis.call('DECR', KEYS[3]) end
if state ~= 'queued' and state ~= 'running' then
  redis.call('XACK', KEYS[2], ARGV[3], ARGV[1]); redis.call('XDEL', KEYS[2], ARGV[1])
  return false
end
local token = redis.call('HINCRBY', KEYS[1], 'token', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'owner', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
return token
"""

# The work side of a cancel: a queued entry leaves the stream and the bound at once; the running worker
# hears it by pub/sub. KEYS (from `first`): work, queue, waiting. ARGV[id], ARGV[channel].
def _cancel_work(first: int, id_arg: int, channel_arg: int) -> str:
    w, q, n = (f"KEYS[{first + i}]" for i in range(3))
    return f"""
local state = redis.call('HGET', {w}, 'state')
if state == 'queued' then
  redis.call('XDEL', {q}, redis.call('HGET', {w}, 'entry')); redis.call('DECR', {n})
end
if state == 'queued' or state == 'running' then
  redis.call('HSET', {w}, 'state', 'cancelled')
  redis.call('PUBLISH', ARGV[{channel_arg}], ARGV[{id_arg}])
end
"""


# KEYS: work, queue, waiting. ARGV: id, channel.
CANCEL = _cancel_work(1, 1, 2) + "return 1\n"

# Each held entry whose token is still this run's is claimed again (its idle time reset); 0 where another
# worker owns the work now (this one was paused past its lease and must stop it).
# KEYS: queue, work... ARGV: group, consumer, then token, entry per work.
RENEW = """
local held = {}
for i = 2, #KEYS do
  local token, entry = ARGV[2 * i - 1], ARGV[2 * i]
  if redis.call('HGET', KEYS[i], 'token') == token then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, entry, 'JUSTID')
    held[i - 1] = 1
  else
    held[i - 1] = 0
  end
end
return held
"""

# Work this worker stopped because it was cancelled: acknowledged and removed, if still its own.
# KEYS: work, queue. ARGV: token, group.
RELEASE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('XACK', KEYS[2], ARGV[2], entry); redis.call('XDEL', KEYS[2], entry)
return 1
"""

_ACK_WORK = """
local entry = redis.call('HGET', KEYS[1], 'entry')
if redis.call('HGET', KEYS[1], 'state') == 'running' then redis.call('HSET', KEYS[1], 'state', 'done') end
redis.call('XACK', KEYS[3], ARGV[6], entry); redis.call('XDEL', KEYS[3], entry)
"""

# tell / finish / fail of plain work, fenced by the run's token; a final event also acknowledges and
# removes the entry. KEYS: work, its events, queue. ARGV: token, kind, data, final, maxlen, group, keep.
WRITE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'kind', ARGV[2], 'data', ARGV[3])
if ARGV[4] == '1' then
""" + _ACK_WORK + """
  redis.call('EXPIRE', KEYS[1], ARGV[7]); redis.call('EXPIRE', KEYS[2], ARGV[7])
end
return 1
"""

# ---- jobs ---------------------------------------------------------------------------------------------

_FINAL = "local function final(s) return s == 'succeeded' or s == 'failed' or s == 'cancelled' end\n"

# A job's transition written by the worker that runs it, fenced by the run's token and by the job not
# having ended (a cancel may have ended it): the record, its status (and the counts by status), its
# events. A final one also acknowledges the work, keeps the result, and enters the retention sets.
# Returns 1, 0 (the lease was taken over) or -1 (the job had ended; a final write still acknowledges).
# KEYS: 1 work, 2 job, 3 job events, 4 queue, 5 counts, 6 result, 7 retention set, 8 meta, 9 result
# bytes, 10 idempotency key (or the job key). ARGV: 1 token, 2 record, 3 status, 4 events kept, 5 final,
# 6 group, 7 ttl, 8 now, 9 result ('' when none is kept), 10 id, 11 meta, then name, data per event.
WRITE_JOB = _FINAL + """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
local cur = redis.call('HGET', KEYS[2], 'status')
if not cur or final(cur) then
  if ARGV[5] == '1' then
""" + _ACK_WORK.replace("KEYS[3]", "KEYS[4]") + """
  end
  return -1
end
redis.call('HSET', KEYS[2], 'record', ARGV[2], 'status', ARGV[3])
if cur ~= ARGV[3] then
  redis.call('HINCRBY', KEYS[5], cur, -1); redis.call('HINCRBY', KEYS[5], ARGV[3], 1)
end
for i = 12, #ARGV, 2 do
  redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[4], '*', 'event', ARGV[i], 'data', ARGV[i + 1])
end
if ARGV[5] == '1' then
""" + _ACK_WORK.replace("KEYS[3]", "KEYS[4]") + """
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  if ARGV[9] ~= '' then
    redis.call('SET', KEYS[6], ARGV[9], 'EX', ARGV[7])
    redis.call('INCRBY', KEYS[9], string.len(ARGV[9]))
  end
  redis.call('ZADD', KEYS[7], ARGV[8], ARGV[10]); redis.call('HSET', KEYS[8], ARGV[10], ARGV[11])
  redis.call('EXPIRE', KEYS[2], ARGV[7]); redis.call('EXPIRE', KEYS[3], ARGV[7])
  redis.call('EXPIRE', KEYS[10], ARGV[7])
end
return 1
"""

# Cancel a job from any replica: unless it ended, it ends `cancelled` (its final event) and its work is
# cancelled (a queued entry leaves the queue; the running worker hears it). Returns 'ok' or the status it
# had already ended with; nil when unknown. KEYS: 1 job, 2 job events, 3 counts, 4 retention set of
# cancelled jobs, 5 meta, 6 idempotency key (or the job key), 7 work, 8 queue, 9 waiting. ARGV: 1 record,
# 2 the event's data, 3 events kept, 4 ttl, 5 now, 6 id, 7 meta, 8 cancel channel.
CANCEL_JOB = _FINAL + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return false end
if final(cur) then return cur end
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'status', 'cancelled')
redis.call('HINCRBY', KEYS[3], cur, -1); redis.call('HINCRBY', KEYS[3], 'cancelled', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], '*', 'event', 'cancelled', 'data', ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[6]); redis.call('HSET', KEYS[5], ARGV[6], ARGV[7])
for i = 1, 2 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
redis.call('EXPIRE', KEYS[6], ARGV[4])
""" + _cancel_work(7, 6, 8) + "return 'ok'\n"

# Retention of finished jobs (SPEC section 7): past the TTL they go; results beyond the byte bound expire,
# oldest first (the record stays and says so); beyond the count bound cancelled jobs go first, then failed
# ones and those without their result, then the oldest results. Returns {dropped, expired ids...}.
# KEYS: 1..3 retention sets (cancelled; failed or expired; kept results), 4 meta, 5 result bytes, 6 counts.
# ARGV: 1 key prefix, 2 now, 3 ttl, 4 most finished jobs, 5 most result bytes.
RETAIN = """
local prefix = ARGV[1]
local function drop(id, set)
  local raw = redis.call('HGET', KEYS[4], id)
  redis.call('ZREM', KEYS[set], id)
  if not raw then return end
  local m = cjson.decode(raw)
  redis.call('HDEL', KEYS[4], id)
  if m.bytes > 0 then redis.call('DECRBY', KEYS[5], m.bytes) end
  redis.call('HINCRBY', KEYS[6], m.status, -1)
  redis.call('DEL', prefix .. 'job:' .. id, prefix .. 'jobevents:' .. id, prefix .. 'result:' .. id)
  redis.call('ZREM', m.listing, id)
  if m.idem ~= '' and redis.call('GET', m.idem) == id then redis.call('DEL', m.idem) end
end
local dropped = 0
local cutoff = tonumber(ARGV[2]) - tonumber(ARGV[3])
for set = 1, 3 do
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[set], '-inf', cutoff)) do
    drop(id, set); dropped = dropped + 1
  end
end
local expired = {}
local bytes = tonumber(redis.call('GET', KEYS[5]) or '0')
while bytes > tonumber(ARGV[5]) do
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if #oldest == 0 then break end
  local id = oldest[1]
  local m = cjson.decode(redis.call('HGET', KEYS[4], id) or '{"bytes":0}')
  local size = m.bytes or 0
  redis.call('DEL', prefix .. 'result:' .. id)
  redis.call('HSET', prefix .. 'job:' .. id, 'expired', '1')
  redis.call('DECRBY', KEYS[5], size); bytes = bytes - size
  redis.call('ZREM', KEYS[3], id); redis.call('ZADD', KEYS[2], oldest[2], id)
  if m.status then m.bytes = 0; redis.call('HSET', KEYS[4], id, cjson.encode(m)) end
  expired[#expired + 1] = id
end
local count = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[3])
local set = 1
while count > tonumber(ARGV[4]) and set <= 3 do
  local oldest = redis.call('ZRANGE', KEYS[set], 0, 0)
  if #oldest == 0 then set = set + 1 else drop(oldest[1], set); dropped = dropped + 1; count = count - 1 end
end
return {dropped, unpack(expired)}
"""

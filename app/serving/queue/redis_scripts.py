"""The Lua scripts the Redis queue and job store run: each check-and-write is one script, so that it is
atomic in Redis (docs/ARCHITECTURE.md, "Many replicas as one service", has the keys and their states).

Scripts name every key they touch in KEYS, except the retention sweep, which drops a finished job's
keys by name from its prefix (a single Redis, not a cluster).
"""

from __future__ import annotations

# ---- the queue ----------------------------------------------------------------------------------------
#
# The stream's entries are tickets: one per queued request, which is the entry's `id` when it is added.
# A worker reads a ticket and claims with it the request that comes first in the fair order (queue/fair.py:
# the sorted set `fair` of waiting requests by tag, `fair@<tenant>` the same per tenant, `clock` the tag
# taken last), not necessarily the one it was added for; that request's own ticket then passes to the
# ticket's owner, so that each queued request always owns exactly one ticket not yet claimed (`entries`:
# ticket -> request). A claimed ticket is the running request's lease (the group's pending entry).
#
# The queue's own keys, always given in this order: waiting, queue, fair, clock, the request's tenant's
# sorted set (`fair@<tenant>`; CLAIM names the one it needs from the prefix), entries.
QUEUE_KEYS = 6

# Refuse when the service-wide bound is reached (returns nil) or the tenant's (returns 'tenant:<n>'), else
# record the request, tag it, and add its ticket to the stream (returns the ticket). KEYS: the queue's,
# then 7 work. ARGV: 1 bound, 2 id, 3 request, 4 images, 5 enqueued, 6 deadline, 7 keep seconds, 8 tenant
# ('' without keys), 9 cost (images / weight), 10 the tenant's bound (0: none).
_PUT_CHECK = """
local waiting = tonumber(redis.call('GET', KEYS[1]) or '0')
local mine = redis.call('ZCARD', KEYS[5])
if tonumber(ARGV[10]) > 0 and mine >= tonumber(ARGV[10]) then return 'tenant:' .. mine end
if waiting >= tonumber(ARGV[1]) then return false end
"""
_PUT_ADD = """
redis.call('INCR', KEYS[1])
local start = tonumber(redis.call('GET', KEYS[4]) or '0')
local last = redis.call('ZRANGE', KEYS[5], -1, -1, 'WITHSCORES')
if #last > 0 then start = math.max(start, tonumber(last[2])) end
local tag = string.format('%.17g', start + tonumber(ARGV[9]))
redis.call('ZADD', KEYS[3], tag, ARGV[2]); redis.call('ZADD', KEYS[5], tag, ARGV[2])
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[2])
redis.call('HSET', KEYS[6], entry, ARGV[2])
redis.call('HSET', KEYS[7], 'state', 'queued', 'entry', entry, 'request', ARGV[3], 'images', ARGV[4],
           'enqueued', ARGV[5], 'deadline', ARGV[6], 'token', '0', 'deliveries', '0', 'tenant', ARGV[8],
           'tag', tag)
redis.call('EXPIRE', KEYS[7], ARGV[7])
"""
PUT = _PUT_CHECK + _PUT_ADD + "return entry\n"

# A job: the same, plus its record, its place in the listing and its Idempotency-Key, all or nothing.
# An Idempotency-Key already taken returns 'known:<id>' and adds nothing. Extra KEYS: 8 job, 9 listing,
# 10 seq counter, 11 idempotency key (the job key again when none), 12 counts by status. Extra ARGV:
# 11 record, 12 '1' when a key is given, 13 keep seconds of the record.
PUT_JOB = """
if ARGV[12] == '1' then
  local known = redis.call('GET', KEYS[11])
  if known then return 'known:' .. known end
end
""" + _PUT_CHECK + _PUT_ADD + """
redis.call('HSET', KEYS[7], 'job', '1')
local seq = redis.call('INCR', KEYS[10])
redis.call('HSET', KEYS[8], 'record', ARGV[11], 'status', 'queued', 'seq', seq, 'tenant', ARGV[8])
redis.call('EXPIRE', KEYS[8], ARGV[13])
redis.call('ZADD', KEYS[9], seq, ARGV[2])
if ARGV[12] == '1' then redis.call('SET', KEYS[11], ARGV[2], 'EX', ARGV[13]) end
redis.call('HINCRBY', KEYS[12], 'queued', 1)
return entry
"""

# Claim with a ticket this worker read (or took over from a lapsed lease): the request first in the fair
# order becomes running under a new token (the clock moves on to its tag); a ticket whose request was
# running already (its worker was lost) gives that request again; a ticket whose request was cancelled or
# finished is dropped. Returns {id, token} or nil. KEYS: the queue's. ARGV: 1 ticket, 2 consumer, 3 group,
# 4 key prefix (the request's key is named from it: a single Redis, not a cluster).
# During a rolling upgrade from a version without the fair order, an entry that replica queued (not in
# `entries`) is claimed as its own request, first in first out, and `fair` members that such a replica
# claimed meanwhile (no longer queued) are passed over and removed.
CLAIM = """
local ticket = ARGV[1]
local function drop()
  redis.call('XACK', KEYS[2], ARGV[3], ticket); redis.call('XDEL', KEYS[2], ticket)
  redis.call('HDEL', KEYS[6], ticket)
  return false
end
local found = redis.call('XRANGE', KEYS[2], ticket, ticket)
if #found == 0 then return drop() end
local owner = redis.call('HGET', KEYS[6], ticket)
local legacy = false
if not owner then
  local fields = found[1][2]
  for i = 1, #fields, 2 do if fields[i] == 'id' then owner = fields[i + 1] end end
  if not owner then return drop() end
  legacy = true
end
local okey = ARGV[4] .. 'work:' .. owner
local state = redis.call('HGET', okey, 'state')
local id, key = owner, okey
if state == 'queued' and legacy then
  redis.call('DECR', KEYS[1]); redis.call('ZREM', KEYS[3], id)
  redis.call('HSET', KEYS[6], ticket, id)
elseif state == 'queued' then
  local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  while #first > 0 and redis.call('HGET', ARGV[4] .. 'work:' .. first[1], 'state') ~= 'queued' do
    redis.call('ZREM', KEYS[3], first[1])
    first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  end
  if #first == 0 then first = {owner, redis.call('ZSCORE', KEYS[3], owner) or '0'} end
  id, key = first[1], ARGV[4] .. 'work:' .. first[1]
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZREM', ARGV[4] .. 'fair@' .. (redis.call('HGET', key, 'tenant') or ''), id)
  redis.call('DECR', KEYS[1])
  if tonumber(first[2]) > tonumber(redis.call('GET', KEYS[4]) or '0') then
    redis.call('SET', KEYS[4], first[2])
  end
  if id ~= owner then
    local own = redis.call('HGET', key, 'entry')
    redis.call('HSET', okey, 'entry', own); redis.call('HSET', KEYS[6], own, owner)
    redis.call('HSET', key, 'entry', ticket); redis.call('HSET', KEYS[6], ticket, id)
  end
elseif state ~= 'running' then
  return drop()
end
local token = redis.call('HINCRBY', key, 'token', 1)
redis.call('HSET', key, 'state', 'running', 'owner', ARGV[2])
redis.call('HINCRBY', key, 'deliveries', 1)
return {id, token}
"""

# The work side of a cancel: a queued request leaves the fair order, the bounds and the stream (its ticket)
# at once; the running worker hears it by pub/sub. KEYS (from `first`): work, then the queue's.
# ARGV[id], ARGV[channel].
def _cancel_work(first: int, id_arg: int, channel_arg: int) -> str:
    w, n, q, f, _, t, e = (f"KEYS[{first + i}]" for i in range(7))
    return f"""
local state = redis.call('HGET', {w}, 'state')
if state == 'queued' then
  local entry = redis.call('HGET', {w}, 'entry')
  redis.call('XDEL', {q}, entry); redis.call('HDEL', {e}, entry); redis.call('DECR', {n})
  redis.call('ZREM', {f}, ARGV[{id_arg}]); redis.call('ZREM', {t}, ARGV[{id_arg}])
end
if state == 'queued' or state == 'running' then
  redis.call('HSET', {w}, 'state', 'cancelled')
  redis.call('PUBLISH', ARGV[{channel_arg}], ARGV[{id_arg}])
end
"""


# KEYS: work, then the queue's. ARGV: id, channel.
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
# KEYS: work, queue, entries. ARGV: token, group.
RELEASE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('XACK', KEYS[2], ARGV[2], entry); redis.call('XDEL', KEYS[2], entry)
redis.call('HDEL', KEYS[3], entry)
return 1
"""


def _ack_work(queue: str, entries: str) -> str:
    """Finished work: done, its ticket acknowledged and removed (KEYS[1] is the work, ARGV[6] the group)."""
    return f"""
local entry = redis.call('HGET', KEYS[1], 'entry')
if redis.call('HGET', KEYS[1], 'state') == 'running' then redis.call('HSET', KEYS[1], 'state', 'done') end
redis.call('XACK', {queue}, ARGV[6], entry); redis.call('XDEL', {queue}, entry)
redis.call('HDEL', {entries}, entry)
"""


# tell / finish / fail of plain work, fenced by the run's token; a final event also acknowledges and
# removes the entry. KEYS: work, its events, queue, entries. ARGV: token, kind, data, final, maxlen, group,
# keep.
WRITE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'kind', ARGV[2], 'data', ARGV[3])
if ARGV[4] == '1' then
""" + _ack_work("KEYS[3]", "KEYS[4]") + """
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
# bytes, 10 idempotency key (or the job key), 11 entries. ARGV: 1 token, 2 record, 3 status, 4 events
# kept, 5 final,
# 6 group, 7 ttl, 8 now, 9 result ('' when none is kept), 10 id, 11 meta, then name, data per event.
WRITE_JOB = _FINAL + """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
local cur = redis.call('HGET', KEYS[2], 'status')
if not cur or final(cur) then
  if ARGV[5] == '1' then
""" + _ack_work("KEYS[4]", "KEYS[11]") + """
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
""" + _ack_work("KEYS[4]", "KEYS[11]") + """
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
# cancelled jobs, 5 meta, 6 idempotency key (or the job key), 7 work, 8.. the queue's. ARGV: 1 record,
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

# Retention of finished jobs (SPEC sections 7 and 12): past the TTL they go; results beyond a tenant's
# byte bound or the total expire, the oldest of that tenant or of the tenant holding the most bytes first
# (the record stays and says so); beyond a tenant's count bound or the total, the tenant holding the most
# loses its own first: cancelled jobs, then failed ones and those without their result, then its oldest
# results. So one tenant's flood never pushes out another's results while that one holds less. The
# per-tenant pass reads every finished job's meta, so it runs only when a bound is exceeded or tenants
# have bounds of their own. Returns {dropped, expired ids...}.
# KEYS: 1..3 retention sets (cancelled; failed or expired; kept results), 4 meta, 5 result bytes, 6 counts.
# ARGV: 1 key prefix, 2 now, 3 ttl, 4 most finished jobs, 5 most result bytes, 6 most finished jobs of one
# tenant (0: none of its own), 7 most result bytes of one tenant (0: none of its own), 8 the tenant whose
# job just finished ('' when none did; it loses a tie of holdings).
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
local maxjobs, maxbytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local tjobs, tbytes = tonumber(ARGV[6]), tonumber(ARGV[7])
local bytes = tonumber(redis.call('GET', KEYS[5]) or '0')
local count = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[3])
if count <= maxjobs and bytes <= maxbytes and tjobs == 0 and tbytes == 0 then return {dropped} end
if tjobs == 0 then tjobs = maxjobs end
if tbytes == 0 then tbytes = maxbytes end
local per = {}
for set = 1, 3 do
  for _, id in ipairs(redis.call('ZRANGE', KEYS[set], 0, -1)) do
    local raw = redis.call('HGET', KEYS[4], id)
    local m = raw and cjson.decode(raw) or {bytes = 0}
    local t = m.tenant or ''
    local p = per[t]
    if not p then p = {n = 0, b = 0, ids = {{}, {}, {}}, at = {1, 1, 1}}; per[t] = p end
    p.n = p.n + 1
    p.b = p.b + (m.bytes or 0)
    table.insert(p.ids[set], id)
  end
end
local function largest(field)
  local best, most = nil, -1
  for t, p in pairs(per) do
    if p[field] > most or (p[field] == most and t == ARGV[8]) then best, most = t, p[field] end
  end
  return best, most
end
local expired = {}
while true do
  local t, most = largest('b')
  if not t or (most <= tbytes and bytes <= maxbytes) then break end
  local p = per[t]
  local id = p.ids[3][p.at[3]]
  if not id then break end
  p.at[3] = p.at[3] + 1
  local m = cjson.decode(redis.call('HGET', KEYS[4], id) or '{"bytes":0}')
  local size = m.bytes or 0
  redis.call('DEL', prefix .. 'result:' .. id)
  redis.call('HSET', prefix .. 'job:' .. id, 'expired', '1')
  redis.call('DECRBY', KEYS[5], size); bytes = bytes - size; p.b = p.b - size
  local score = redis.call('ZSCORE', KEYS[3], id)
  redis.call('ZREM', KEYS[3], id); redis.call('ZADD', KEYS[2], score, id)
  table.insert(p.ids[2], id)
  if m.status then m.bytes = 0; redis.call('HSET', KEYS[4], id, cjson.encode(m)) end
  expired[#expired + 1] = id
end
while true do
  local t, most = largest('n')
  if not t or (most <= tjobs and count <= maxjobs) then break end
  local p = per[t]
  local set = 1
  while set <= 3 and not p.ids[set][p.at[set]] do set = set + 1 end
  if set > 3 then break end
  local id = p.ids[set][p.at[set]]
  p.at[set] = p.at[set] + 1
  drop(id, set); dropped = dropped + 1; count = count - 1; p.n = p.n - 1
end
return {dropped, unpack(expired)}
"""

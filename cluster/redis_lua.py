"""The Lua scripts behind cluster/redis_store.py: each runs atomically in one round trip.

Kept apart because they are data — Redis-side source text — not Python logic; only redis_store
registers and calls them (this module imports nothing).
"""

# ---------------------------------------------------------------------- Lua (atomic, one round trip)
_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# Forget instances whose heartbeat TTL passed (used by the scripts that read or write the registry).
_PRUNE = """
local function prune(p, now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'alive', '-inf', now)) do
    redis.call('HDEL', p .. 'recs', id)
    redis.call('HDEL', p .. 'pendn', id)
    redis.call('ZREM', p .. 'chg', id)
    redis.call('ZREM', p .. 'alive', id)
  end
end
"""

SCRIPTS = {
    # ARGV: prefix, id, record, ttl_ms, grace_ms -> {was alive, wanted role JSON or nil}
    "heartbeat": _NOW + _PRUNE + """
local p, id = ARGV[1], ARGV[2]
prune(p, now)
local existed = redis.call('ZSCORE', p .. 'alive', id) and 1 or 0
redis.call('HSET', p .. 'recs', id, ARGV[3])
redis.call('ZADD', p .. 'alive', now + tonumber(ARGV[4]), id)
redis.call('ZADD', p .. 'chg', redis.call('INCR', p .. 'ver'), id)
-- The load just reported includes what was assigned before (now - grace): stop counting it.
local k = p .. 'pend:' .. id
redis.call('ZREMRANGEBYSCORE', k, '-inf', now - tonumber(ARGV[5]))
redis.call('HSET', p .. 'pendn', id, redis.call('ZCARD', k))
return {existed, redis.call('GET', p .. 'want:' .. id)}""",
    # ARGV: prefix, n_images, new epoch, known epoch, known version, index_ttl_ms, image hashes...,
    # block hashes...
    # -> one JSON string (a single bulk reply parses far faster than nested arrays in redis-py)
    "snapshot": _NOW + _PRUNE + """
local p = ARGV[1]
prune(p, now)
local epoch = redis.call('GET', p .. 'epoch')
if not epoch then
  epoch = ARGV[3]
  redis.call('SET', p .. 'epoch', epoch)
end
local ver, since = tonumber(redis.call('GET', p .. 'ver') or '0'), tonumber(ARGV[5])
local ids = redis.call('ZRANGE', p .. 'alive', 0, -1)
local full = epoch ~= ARGV[4] or since < 0 or since > ver
local want = ids
if not full then want = redis.call('ZRANGEBYSCORE', p .. 'chg', '(' .. since, '+inf') end
local recs = {}
for s = 1, #want, 500 do
  local chunk = {unpack(want, s, math.min(s + 499, #want))}
  local vals = redis.call('HMGET', p .. 'recs', unpack(chunk))
  for j = 1, #chunk do
    if vals[j] then recs[#recs + 1] = chunk[j]; recs[#recs + 1] = vals[j] end
  end
end
-- Index entries are decoded here, in C-backed cjson, so the reply carries only what routing needs.
local oldest, n = now - tonumber(ARGV[6]), tonumber(ARGV[2])
local function entries(kind, first, last)
  local vals = (last >= first) and redis.call('HMGET', p .. kind, unpack(ARGV, first, last)) or {}
  local out = {}
  for i = 1, last - first + 1 do
    local who = {}
    for _, e in ipairs(vals[i] and cjson.decode(vals[i]) or {}) do
      if e[2] >= oldest then who[#who + 1] = e[1] end
    end
    out[i] = who
  end
  return out
end
local mm, depth, flat = entries('mm', 7, 6 + n), {}, {}
for i, who in ipairs(entries('px', 7 + n, #ARGV)) do
  for _, id in ipairs(who) do depth[id] = i end  -- chained hashes: holding block i = holding 1..i
end
for id, d in pairs(depth) do flat[#flat + 1] = id; flat[#flat + 1] = d end
return cjson.encode({ids, recs, redis.call('HGETALL', p .. 'pendn'), mm, flat, epoch, ver, full})""",
    # ARGV: prefix, request_id, window_ms, instance ids (repeats count) ...
    "commit": _NOW + """
local p = ARGV[1]
for i = 4, #ARGV do
  local k = p .. 'pend:' .. ARGV[i]
  redis.call('ZADD', k, now, ARGV[2] .. '#' .. i)
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now - tonumber(ARGV[3]))
  redis.call('PEXPIRE', k, ARGV[3])
  redis.call('HSET', p .. 'pendn', ARGV[i], redis.call('ZCARD', k))
end
return #ARGV - 3""",
    # Index <kind> (mm | px) is a HASH hash -> JSON [[id, ms], ...] newest first, plus a ZSET
    # <kind>idx hash -> last publish ms that bounds it (cap) and ages it out (ttl).
    # ARGV: prefix, kind, id, ttl_ms, cap, holders_cap, add (1/0), hashes... -> number evicted
    "index_update": _NOW + """
local p, kind, id = ARGV[1], ARGV[2], ARGV[3]
local ttl, cap, hcap, add = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7] == '1'
local h, idx = p .. kind, p .. kind .. 'idx'
for i = 8, #ARGV do
  local old, new = redis.call('HGET', h, ARGV[i]), {}
  if add then new[1] = {id, now} end
  if old then
    for _, e in ipairs(cjson.decode(old)) do
      if e[1] ~= id and #new < hcap and e[2] > now - ttl then new[#new + 1] = e end
    end
  end
  if #new > 0 then
    redis.call('HSET', h, ARGV[i], cjson.encode(new))
    if add then redis.call('ZADD', idx, now, ARGV[i]) end
  else
    redis.call('HDEL', h, ARGV[i])
    redis.call('ZREM', idx, ARGV[i])
  end
end
local evicted = redis.call('ZRANGEBYSCORE', idx, '-inf', now - ttl)
local over = redis.call('ZCARD', idx) - #evicted - cap
if over > 0 then
  for _, x in ipairs(redis.call('ZRANGE', idx, #evicted, #evicted + over - 1)) do evicted[#evicted + 1] = x end
end
for s = 1, #evicted, 500 do
  local chunk = {unpack(evicted, s, math.min(s + 499, #evicted))}
  redis.call('HDEL', h, unpack(chunk))
  redis.call('ZREM', idx, unpack(chunk))
end
redis.call('PEXPIRE', h, ttl)
redis.call('PEXPIRE', idx, ttl)
return #evicted""",
    # KEYS: job, jobtok; ARGV: ttl_ms, field, value, ... -> 1, or 0 if the entry is gone
    "journal_update": """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1""",
    # KEYS: job, jobtok; ARGV: start, count, tokens JSON, ttl_ms, now_ms -> token count (-1: gone)
    "journal_append": """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = tonumber(redis.call('HGET', KEYS[1], 'n_tokens'))
local start, cnt, chunk = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
if start + cnt <= n then return n end  -- a retried append: already recorded
if start > n then return redis.error_reply('journal gap: have ' .. n .. ' tokens, append starts at ' .. start) end
if start < n then  -- overlap: keep only the new tail
  local toks, tail = cjson.decode(chunk), {}
  for i = n - start + 1, #toks do tail[#tail + 1] = toks[i] end
  chunk, cnt = cjson.encode(tail), #tail
end
redis.call('RPUSH', KEYS[2], chunk)
redis.call('HSET', KEYS[1], 'n_tokens', n + cnt, 'updated_ms', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return n + cnt""",
    # A lease (one controller acts at a time). KEYS: lease; ARGV: holder, ttl_ms -> 1 renewed, 0 not ours
    "lease_renew": """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0""",
    # KEYS: lease; ARGV: holder -> 1 released, 0 not ours (expired, or taken over: leave it alone)
    "lease_release": """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0""",
    # KEYS: bucket; ARGV: capacity, refill_per_s, cost -> {allowed, remaining (str), retry_after_ms}
    "rate_limit": """
local t = redis.call('TIME')
local now = t[1] * 1000 + t[2] / 1000
local cap, rate, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or cap
local ts = tonumber(b[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - ts) * rate / 1000)
local allowed, retry = 0, 0
if tokens >= cost then
  tokens, allowed = tokens - cost, 1
else
  retry = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', string.format('%.3f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((cap - tokens) * 1000 / rate) + 1000)
return {allowed, string.format('%.6f', tokens), retry}""",
}

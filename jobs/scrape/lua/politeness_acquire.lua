-- Ask for one of a host's request slots (jobs/scrape/politeness.py): a concurrency limit and a
-- minimum delay between request starts, by Redis's own clock. In mode 'turn' the waiter books a
-- turn (a start time, one delay after the previous turn) and starts when it is due; in mode
-- 'now' it starts as soon as the host allows, ahead of booked turns.
-- Returns {wait_ms, queued_ms, postpone}: wait 0 means the slot is taken (queued_ms since the
-- turn was first booked); else wait wait_ms in place (postpone 0) or postpone the job by wait_ms.
local leases_key = KEYS[1]  -- zset: token -> lease end (ms)
local gate_key = KEYS[2]  -- the earliest next start (ms)
local tail_key = KEYS[3]  -- the earliest time a new turn can be booked (ms)
local turn_key = KEYS[4]  -- this waiter's turn, "start:first booked" (ms)
local token = ARGV[1]  -- this request's lease
local limit = tonumber(ARGV[2])  -- requests at once
local lease = tonumber(ARGV[3])  -- ms a lease lasts
local delay = tonumber(ARGV[4])  -- ms between two starts
local mode = ARGV[5]  -- 'turn' or 'now'
local in_place = tonumber(ARGV[6])  -- ms the caller may still wait in place
local ttl = tonumber(ARGV[7])  -- ms a booked turn outlives its time
local busy = tonumber(ARGV[8])  -- ms a due turn at a busy host is put back by, at least

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', leases_key, '-inf', now)
local gate = tonumber(redis.call('GET', gate_key) or '0')
local first = now
local function book(earliest)
  local start = math.max(earliest, gate, tonumber(redis.call('GET', tail_key) or '0'))
  redis.call('SET', tail_key, start + delay, 'PX', start + delay - now + ttl)
  redis.call('SET', turn_key, start .. ':' .. first, 'PX', start - now + ttl)
  return start
end
if mode == 'turn' then
  local turn = redis.call('GET', turn_key)
  local start
  if turn then
    local sep = string.find(turn, ':', 1, true)
    start, first = tonumber(string.sub(turn, 1, sep - 1)), tonumber(string.sub(turn, sep + 1))
  else
    start = book(now)
  end
  if start > now then
    return {start - now, 0, start - now > in_place and 1 or 0}
  end
end
local wait = gate - now
if redis.call('ZCARD', leases_key) >= limit then wait = math.max(wait, 25) end
if wait <= 0 then
  redis.call('ZADD', leases_key, now + lease, token)
  redis.call('PEXPIRE', leases_key, lease)
  if delay > 0 then redis.call('SET', gate_key, now + delay, 'PX', delay + 1000) end
  redis.call('DEL', turn_key)
  return {0, now - first, 0}
end
if mode ~= 'turn' or wait <= in_place then return {wait, 0, 0} end
-- Due, but the host will not be free soon (slow pages at the concurrency limit, or requests
-- that went ahead): a new turn at the back of the line, keeping when this one was first booked.
return {book(now + math.max(wait, busy)) - now, 0, 1}

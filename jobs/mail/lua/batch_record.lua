-- Record how messages of a newsletter ended (jobs/mail/outcomes.py, count_in_batch): each in
-- one of the batch's sent, failed and aborted sets, and out of the others (a set member is
-- counted once however often it is recorded: a job re-run after a kill adds nothing), and,
-- in the same call, release the newsletter's callback when the last one is recorded.
-- "aborted" never overrides a message sent or failed. With `unknown_only` a message is
-- recorded only if it is in no set and has no job (never enqueued, or its job ended without
-- recording itself): a stopped fan-out's rest. For one message, its sent marker too.
-- The callback (the batch hash's `callback` field: a job written by jobs/engine/lua/
-- enqueue_waiting.lua, waiting on a count) is released as finish.lua releases a dependent:
-- once, while its waits hash says "waiting", with the counts (n:sent, n:failed, n:aborted), put in its queue due now.
-- O(1) per message: three SCARDs, a few hash fields. Not cluster-safe: the callback's waits
-- hash, queue, wake list and waiting index are named in the batch hash and the waits hash.
-- Returns the number of messages newly counted.
local batch = KEYS[1]  -- the newsletter's hash: total, aborted, callback
local sent_set, failed_set, aborted_set = KEYS[2], KEYS[3], KEYS[4]
local marker = KEYS[5]  -- the message's sent marker (written when write_marker is "1")
-- then with unknown_only, each message's job key, from KEYS[6]
local outcome = ARGV[1]  -- "sent", "failed" or "aborted"
local ttl_s = ARGV[2]  -- how long the sets (and the marker) are kept
local now = tonumber(ARGV[3])  -- ms
local waits_prefix = ARGV[4]  -- + the callback's id: its waits hash
local unknown_only = ARGV[5]  -- "1": only messages with no outcome and no job
local write_marker = ARGV[6]  -- "1": SET the sent marker
-- then each message's id, from ARGV[7]
local FIRST_KEY, FIRST_ARG = 6, 7

local sets = {sent = sent_set, failed = failed_set, aborted = aborted_set}
local target = sets[outcome]
local added = 0
for n = 0, #ARGV - FIRST_ARG do
  local id = ARGV[FIRST_ARG + n]
  if unknown_only == '1' or outcome == 'aborted' then
    local known = redis.call('SISMEMBER', sent_set, id) == 1
        or redis.call('SISMEMBER', failed_set, id) == 1
    if unknown_only == '1' and not known then
      local job_key = KEYS[FIRST_KEY + n]
      known = redis.call('SISMEMBER', aborted_set, id) == 1
          or redis.call('EXISTS', job_key) == 1
    end
    if not known then added = added + redis.call('SADD', target, id) end
  else
    local moved = 0
    for name, set in pairs(sets) do
      if name ~= outcome then moved = moved + redis.call('SREM', set, id) end
    end
    added = added + redis.call('SADD', target, id) - moved
  end
end
if added ~= 0 or unknown_only ~= '1' then redis.call('EXPIRE', target, ttl_s) end
if write_marker == '1' then redis.call('SET', marker, '1', 'EX', ttl_s) end

local callback = redis.call('HGET', batch, 'callback')
if not callback then return added end
local waits = waits_prefix .. callback
local state = redis.call('HMGET', waits, 'state', 'total', 'queue', 'wake', 'hint', 'waiting')
if state[1] ~= 'waiting' then return added end  -- released already, or the callback aborted
local sent = redis.call('SCARD', sent_set)
local failed = redis.call('SCARD', failed_set)
local aborted = redis.call('SCARD', aborted_set)
local left = tonumber(state[2]) - sent - failed - aborted
if left > 0 then
  redis.call('HSET', waits, 'pending', left)
  return added
end
redis.call('HSET', waits, 'state', 'released', 'pending', 0, 'n:sent', sent,
           'n:failed', failed, 'n:aborted', aborted)
redis.call('ZADD', state[3], now, callback)
if state[5] ~= '' then redis.call('ZADD', state[5], now, callback) end
if redis.call('LLEN', state[4]) == 0 then redis.call('LPUSH', state[4], 1) end
if state[6] then redis.call('ZREM', state[6], callback) end
return added

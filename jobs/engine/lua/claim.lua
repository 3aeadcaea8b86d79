-- Claim up to `limit` due jobs of one queue (jobs/engine/queue.py, claim), transactional ones
-- first: while both classes wait, one claim in `bulk_every` takes the oldest bulk job. Each
-- claimed job gets its in-progress key for a lease, its score pushed to the lease's end (a
-- visibility timeout), its try counted, and is read.
-- Returns {abort ids, claimed, next score}: the ids in the abort set; claimed flat (id, score,
-- job bytes or false, try, 1 if it was aborted while queued); the earliest score in the queue
-- after now (a deferred job's time, or a lease's end), or false.
--
-- The transactional index holds the ids of transactional jobs as a hint, checked against the
-- queue here (a finished job's entry is dropped, a running or deferred one's moved to its
-- queue score), so no other script has to keep it exact.
--
-- Not cluster-safe: the ids are found here, so each job's in-progress, job and retry keys are
-- built from their prefixes (arq's layout gives them no hash tag); see docs/engine.md.
local queue = KEYS[1]
local abort_set = KEYS[2]
local transactional = KEYS[3]
local bulk_turn = KEYS[4]  -- where the claims are in their cycle of transactional and bulk
local now = tonumber(ARGV[1])  -- ms
local limit = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])  -- ms
local in_progress_prefix = ARGV[4]
local job_prefix = ARGV[5]
local retry_prefix = ARGV[6]
local retry_ttl_s = ARGV[7]
local bulk_every = tonumber(ARGV[8])

local aborts = {}
local abort_count = redis.call('ZCARD', abort_set)
if abort_count > 0 then aborts = redis.call('ZRANGE', abort_set, 0, -1) end
local claimed = {}
if limit > 0 then
  local urgent, bulk = {}, {}
  local has_urgent = redis.call('ZCARD', transactional) > 0
  if has_urgent then
    local hints = redis.call('ZRANGEBYSCORE', transactional, '-inf', now, 'LIMIT', 0, 2 * limit)
    for _, id in ipairs(hints) do
      local score = redis.call('ZSCORE', queue, id)
      if not score then
        redis.call('ZREM', transactional, id)
      elseif tonumber(score) > now then
        redis.call('ZADD', transactional, score, id)
      else
        urgent[#urgent + 1] = {id, score}
      end
    end
  end
  local due = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'WITHSCORES',
                        'LIMIT', 0, limit + #urgent)
  for i = 1, #due, 2 do
    local hint = has_urgent and redis.call('ZSCORE', transactional, due[i])
    if not hint then
      bulk[#bulk + 1] = {due[i], due[i + 1]}
    elseif tonumber(hint) > now then  -- a transactional job due before its hint said
      redis.call('ZADD', transactional, due[i + 1], due[i])
      urgent[#urgent + 1] = {due[i], due[i + 1]}
    end
  end
  local turn = tonumber(redis.call('GET', bulk_turn) or '0')
  local u, b, picks = 1, 1, {}
  while #picks < limit and (u <= #urgent or b <= #bulk) do
    local take_bulk = u > #urgent
    if u <= #urgent and b <= #bulk then
      turn = turn + 1
      take_bulk = turn % bulk_every == 0
    end
    if take_bulk then
      picks[#picks + 1] = bulk[b]; b = b + 1
    else
      picks[#picks + 1] = urgent[u]; u = u + 1
    end
  end
  redis.call('SET', bulk_turn, turn % bulk_every)
  for _, pick in ipairs(picks) do
    local id = pick[1]
    if redis.call('SET', in_progress_prefix .. id, '1', 'NX', 'PX', lease) then
      redis.call('ZADD', queue, 'XX', now + lease, id)
      if has_urgent then redis.call('ZADD', transactional, 'XX', now + lease, id) end
      local retry_key = retry_prefix .. id
      local try = redis.call('INCR', retry_key)
      if try == 1 then redis.call('EXPIRE', retry_key, retry_ttl_s) end
      local aborted = 0
      if abort_count > 0 then aborted = redis.call('ZREM', abort_set, id) end
      local n = #claimed
      claimed[n + 1] = id
      claimed[n + 2] = pick[2]
      claimed[n + 3] = redis.call('GET', job_prefix .. id)
      claimed[n + 4] = try
      claimed[n + 5] = aborted
    end
  end
end
local next_due = redis.call('ZRANGEBYSCORE', queue, '(' .. now, '+inf',
                           'WITHSCORES', 'LIMIT', 0, 1)
return {aborts, claimed, next_due[2] or false}

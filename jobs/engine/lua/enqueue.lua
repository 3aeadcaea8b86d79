-- Enqueue one job in arq 0.28's layout (jobs/engine/queue.py, _Enqueue): refuse an id whose
-- job or result exists, store the job, add it to the queue (and to the transactional index for
-- a transactional job), count it for the metrics and push a wake-up unless one already waits.
-- With a unique key (KEYS[7], jobs/engine/unique.py): while the job whose id it holds still
-- has its job key (queued, deferred, running or waiting for a retry), that job is the answer
-- and nothing is enqueued; otherwise the new job takes the key for the window. The holder's
-- job key is read by a name built here from its id (not in KEYS: docs/engine.md).
-- Returns 1 if the job was added, 0 if its id was taken, or the holder's id (a string).
local job_key = KEYS[1]
local result_key = KEYS[2]
local queue = KEYS[3]
local counters = KEYS[4]
local wake = KEYS[5]
local transactional = KEYS[6]
local unique = KEYS[7]  -- absent: no unique key
local job = ARGV[1]  -- arq's serialized job
local expires_ms = ARGV[2]
local score = ARGV[3]  -- ms: when the job is due
local job_id = ARGV[4]
local counter_field = ARGV[5]  -- "enqueued|<function>"
local is_transactional = ARGV[6]  -- "1" or "0"
local unique_window_ms = ARGV[7]  -- with a unique key: how long it holds at most
local job_key_prefix = ARGV[8]  -- with a unique key: arq's job key prefix, for the holder's

if unique then
  local holder = redis.call('GET', unique)
  -- the holder under this very id is the caller's own earlier try (an Idempotency-Key's
  -- derived id, a schedule's period): answered as a taken id below
  if holder and holder ~= job_id and redis.call('EXISTS', job_key_prefix .. holder) == 1 then
    return holder
  end
end
if redis.call('EXISTS', job_key, result_key) > 0 then return 0 end
redis.call('SET', job_key, job, 'PX', expires_ms)
redis.call('ZADD', queue, score, job_id)
if is_transactional == '1' then redis.call('ZADD', transactional, score, job_id) end
redis.call('HINCRBY', counters, counter_field, 1)
if redis.call('LLEN', wake) == 0 then redis.call('LPUSH', wake, 1) end
if unique then redis.call('SET', unique, job_id, 'PX', unique_window_ms) end
return 1

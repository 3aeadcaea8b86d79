-- Enqueue one job in arq 0.28's layout (jobs/engine/queue.py, EnqueueCall): refuse an id whose
-- job or result exists, store the job, add it to the queue (and to the transactional index for
-- a transactional job), count it for the metrics and push a wake-up unless one already waits.
-- Returns 1 if the job was added, 0 if its id was taken.
local job_key = KEYS[1]
local result_key = KEYS[2]
local queue = KEYS[3]
local counters = KEYS[4]
local wake = KEYS[5]
local transactional = KEYS[6]
local job = ARGV[1]  -- arq's serialized job
local expires_ms = ARGV[2]
local score = ARGV[3]  -- ms: when the job is due
local job_id = ARGV[4]
local counter_field = ARGV[5]  -- "enqueued|<function>"
local is_transactional = ARGV[6]  -- "1" or "0"

if redis.call('EXISTS', job_key, result_key) > 0 then return 0 end
redis.call('SET', job_key, job, 'PX', expires_ms)
redis.call('ZADD', queue, score, job_id)
if is_transactional == '1' then redis.call('ZADD', transactional, score, job_id) end
redis.call('HINCRBY', counters, counter_field, 1)
if redis.call('LLEN', wake) == 0 then redis.call('LPUSH', wake, 1) end
return 1

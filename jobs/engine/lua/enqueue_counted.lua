-- Enqueue a batch's callback that waits on a count rather than on parents (jobs/engine/
-- dependencies.py, enqueue_counted_callback): a newsletter's, whose messages are enqueued as it
-- runs. Its record and waits hash are written as enqueue_waiting.lua writes a waiting job's
-- (state "waiting", `pending` = `total`, the names finish.lua's release reads: queue, wake
-- list, transactional hint, waiting index), but no parent's dependents set names it: the
-- script that records the batch's outcomes (jobs/mail/lua/batch_record.lua) releases it, once,
-- when the last one is recorded. `outcomes` names the counts it is handed (`n:<outcome>`).
-- Returns {1} when written, {0} if the job's id is taken (a retried request: left as it is).
local job_key = KEYS[1]
local result_key = KEYS[2]
local queue = KEYS[3]
local counters = KEYS[4]
local wake = KEYS[5]
local transactional = KEYS[6]
local waits = KEYS[7]
local waiting_index = KEYS[8]  -- the queue's waiting jobs (asyncjobs.keys.waiting_key)
local job = ARGV[1]  -- arq's serialized job
local ttl_ms = tonumber(ARGV[2])  -- how long the job and its waits hash live
local job_id = ARGV[3]
local counter_field = ARGV[4]  -- "enqueued|<function>"
local is_transactional = ARGV[5]  -- "1" or "0"
local now = tonumber(ARGV[6])  -- ms
local shown = ARGV[7]  -- JSON: what the job waits for, as its status shows it
local total = tonumber(ARGV[8])  -- outcomes to wait for
local outcomes = ARGV[9]  -- "sent,failed,aborted": the counts it is handed, in order

if redis.call('EXISTS', job_key, result_key) > 0 then return {0} end
local hint = ''
if is_transactional == '1' then hint = transactional end
redis.call('SET', job_key, job, 'PX', ttl_ms)
redis.call('HSET', waits, 'state', 'waiting', 'pending', total, 'total', total,
           'allow_failure', '1', 'pass_result', '0', 'queue', queue, 'wake', wake,
           'hint', hint, 'shown', shown, 'waiting', waiting_index, 'outcomes', outcomes)
redis.call('PEXPIRE', waits, ttl_ms)
redis.call('ZADD', waiting_index, now, job_id)
redis.call('PEXPIRE', waiting_index, ttl_ms)  -- outlives its newest entry, no longer
redis.call('HINCRBY', counters, counter_field, 1)
return {1}

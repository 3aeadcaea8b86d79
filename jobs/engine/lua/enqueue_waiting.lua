-- Enqueue one job that waits for others (jobs/engine/dependencies.py, WaitingEnqueue): `after`,
-- `then` and a batch's callback. Its record is stored as enqueue.lua stores a job, but it goes
-- in the queue only once its parents have ended (finish.lua releases it). Each parent is
-- checked here, atomically with the write: ended (its marker, or for a completion with its
-- result kept, that result: counted now), still to run (its job key exists: this job joins its
-- dependents set) or unknown (refused).
-- A batch's callback may also wait on a count (`count`: a newsletter's messages, enqueued as it
-- runs, so no parent list exists): its pending count starts there, no dependents set names it
-- for that part, and the script that records the batch's outcomes (jobs/mail/lua/
-- batch_record.lua) releases it when the last one is recorded; `outcomes` names the counts it
-- is handed (`n:<outcome>`).
-- A job left waiting is also added to its queue's waiting index (scored by its enqueue time, the
-- dashboard's list of waiting jobs), whose name its waits hash keeps for finish.lua's release.
-- Returns {1, state} when written (state "waiting", "released" or "cancelled"), {0} if the
-- job's id is taken, {-1, parent id} for a parent that is neither ended nor enqueued.
local job_key = KEYS[1]
local result_key = KEYS[2]
local queue = KEYS[3]
local counters = KEYS[4]
local wake = KEYS[5]
local transactional = KEYS[6]
local waits = KEYS[7]
local waiting_index = KEYS[8]  -- the queue's waiting jobs (asyncjobs.keys.waiting_key)
-- then four keys per parent, from KEYS[9]: its job, ended marker, dependents set and result
local job = ARGV[1]  -- arq's serialized job
local ttl_ms = tonumber(ARGV[2])  -- how long the job, its waits hash and dependents sets live
local job_id = ARGV[3]
local counter_field = ARGV[4]  -- "enqueued|<function>"
local is_transactional = ARGV[5]  -- "1" or "0"
local allow_failure = ARGV[6]  -- "1": run even when a parent did not complete
local pass_result = ARGV[7]  -- "1": keep the (one) parent's result for the job (`then`)
local now = tonumber(ARGV[8])  -- ms
local shown = ARGV[9]  -- JSON: what the job waits for, as its status shows it
local count = tonumber(ARGV[10])  -- outcomes to wait for besides its parents' (0: none)
local outcomes = ARGV[11]  -- "sent,failed,aborted": a counted callback's counts ("": a job's)
-- then each parent's id, from ARGV[12]
local FIRST_KEY, KEYS_PER_PARENT, FIRST_ARG = 9, 4, 12

if redis.call('EXISTS', job_key, result_key) > 0 then return {0} end
local parents = #ARGV - FIRST_ARG + 1
local pending, counts, waiting_on = count, {}, {}
local cancel = nil
for n = 0, parents - 1 do
  local k = FIRST_KEY + n * KEYS_PER_PARENT
  local parent_job, parent_ended = KEYS[k], KEYS[k + 1]
  local parent_dependents, parent_result = KEYS[k + 2], KEYS[k + 3]
  local parent = ARGV[FIRST_ARG + n]
  local ended = redis.call('GET', parent_ended)
  if ended then
    local bar = string.find(ended, '|', 1, true)
    local outcome, err = string.sub(ended, 1, bar - 1), string.sub(ended, bar + 1)
    counts[outcome] = (counts[outcome] or 0) + 1
    if outcome ~= 'complete' and allow_failure ~= '1' and not cancel then
      cancel = {parent, outcome, err}
    end
    if outcome == 'complete' and pass_result == '1' then
      local result = redis.call('GET', parent_result)
      if result then redis.call('HSET', waits, 'result', result) end
    end
  elseif redis.call('EXISTS', parent_job) == 1 then
    pending = pending + 1
    waiting_on[#waiting_on + 1] = parent_dependents
  elseif redis.call('EXISTS', parent_result) == 1 then
    -- ended with no marker: completed, its result kept (finish.lua writes a marker otherwise)
    counts['complete'] = (counts['complete'] or 0) + 1
    if pass_result == '1' then
      redis.call('HSET', waits, 'result', redis.call('GET', parent_result))
    end
  else
    return {-1, parent}
  end
end

local hint = ''
if is_transactional == '1' then hint = transactional end
local state = 'waiting'
if cancel then state = 'cancelled' elseif pending == 0 then state = 'released' end
redis.call('SET', job_key, job, 'PX', ttl_ms)
redis.call('HSET', waits, 'state', state, 'pending', pending, 'total', parents + count,
           'allow_failure', allow_failure, 'pass_result', pass_result, 'queue', queue,
           'wake', wake, 'hint', hint, 'shown', shown, 'waiting', waiting_index)
for outcome, n in pairs(counts) do redis.call('HSET', waits, 'n:' .. outcome, n) end
if outcomes ~= '' then redis.call('HSET', waits, 'outcomes', outcomes) end
if cancel then
  redis.call('HSET', waits, 'cancelled_by', cancel[1], 'cancel_outcome', cancel[2],
             'cancel_error', cancel[3])
end
redis.call('PEXPIRE', waits, ttl_ms)
if state == 'waiting' then
  for _, dependents in ipairs(waiting_on) do
    redis.call('SADD', dependents, job_id)
    if redis.call('PTTL', dependents) < ttl_ms then redis.call('PEXPIRE', dependents, ttl_ms) end
  end
  redis.call('ZADD', waiting_index, now, job_id)
  redis.call('PEXPIRE', waiting_index, ttl_ms)  -- outlives its newest entry, no longer
else
  redis.call('ZADD', queue, now, job_id)
  if hint ~= '' then redis.call('ZADD', transactional, now, job_id) end
  if redis.call('LLEN', wake) == 0 then redis.call('LPUSH', wake, 1) end
end
redis.call('HINCRBY', counters, counter_field, 1)
return {1, state}

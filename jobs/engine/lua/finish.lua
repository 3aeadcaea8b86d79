-- Write how each of a batch of jobs ended (jobs/engine/queue.py, finish and Finish):
-- "done": its result kept (if any), its job, retry and in-progress keys deleted, out of the
-- queue and the abort set; "again": back in the queue at its next try's score, its in-progress
-- key deleted; "later": the same, but this run was not a try (asyncjobs.errors.Postpone), so its
-- try count is given back. A try's JSON record is appended to the job's tries list, which keeps
-- the last `kept` and expires with the job's result.
-- A job put back for a later try keeps its data and its try count at least until then: arq sets
-- their TTLs once (a day), and an email retried for two days would otherwise vanish midway.
-- A job that ends for good ("done" with an outcome) also leaves an ended marker ("<outcome>|
-- <error>", kept as long as its result) unless it completed with its result kept, and releases the jobs waiting on it (its dependents
-- set, jobs/engine/dependencies.py): each one's pending count goes down and its outcome is
-- counted; one whose parent did not complete (and that does not allow failure) is cancelled,
-- and one with nothing left to wait for (or cancelled) is put in its queue, due now. This is
-- in the same script as the end itself, so a crash cannot release a dependent twice or never.
-- A released or cancelled dependent leaves its queue's waiting index (named in its waits hash).
-- Not cluster-safe: the dependents' waits hashes, queues, wake lists and waiting indexes are
-- found here (their names are built from a prefix, or read from the waits hash), so they are
-- not in KEYS.
-- Returns the number of jobs written.
local queue = KEYS[1]
local abort_set = KEYS[2]
local transactional = KEYS[3]
-- then seven keys per job, from KEYS[4]: in-progress, job, retry, result, tries, dependents,
-- ended marker
local now = tonumber(ARGV[1])  -- ms
local extra = tonumber(ARGV[2])  -- ms to keep a job's data past its next try
local kept = tonumber(ARGV[3])  -- tries kept in a job's tries list
local waits_prefix = ARGV[4]  -- + a dependent's id: its waits hash
local ended_ttl = tonumber(ARGV[5])  -- ms to keep an ended marker when no result is kept
-- then nine fields per job, from ARGV[6]: id, mode ("done", "again" or "later"), result bytes
-- ("" for none), result TTL ms (0: for ever), new score (for "again" and "later"), ms to keep
-- the in-progress key (0: delete it), the try's JSON record ("" for none), the outcome of a
-- job that ended for good ("complete", "failed", "aborted"; "" otherwise), its error ("")
local FIRST_KEY, KEYS_PER_JOB, FIRST_ARG, ARGS_PER_JOB = 4, 7, 6, 9

-- One dependent of a job that ended: count the end, and queue it once it may run (or is
-- cancelled). A dependent no longer waiting (released, cancelled or aborted) is left alone.
local function release(child, parent, outcome, err, result)
  local waits = waits_prefix .. child
  local state = redis.call('HMGET', waits, 'state', 'allow_failure', 'pass_result', 'queue',
                           'wake', 'hint', 'waiting')
  if state[1] ~= 'waiting' then return end
  local pending = redis.call('HINCRBY', waits, 'pending', -1)
  redis.call('HINCRBY', waits, 'n:' .. outcome, 1)
  if state[3] == '1' and outcome == 'complete' then redis.call('HSET', waits, 'result', result) end
  local release_it = pending <= 0
  if outcome ~= 'complete' and state[2] ~= '1' then
    redis.call('HSET', waits, 'state', 'cancelled', 'cancelled_by', parent,
               'cancel_outcome', outcome, 'cancel_error', err)
    release_it = true
  elseif release_it then
    redis.call('HSET', waits, 'state', 'released')
  end
  if release_it then
    redis.call('ZADD', state[4], now, child)
    if state[6] ~= '' then redis.call('ZADD', state[6], now, child) end
    if redis.call('LLEN', state[5]) == 0 then redis.call('LPUSH', state[5], 1) end
    if state[7] then redis.call('ZREM', state[7], child) end
  end
end

local check_abort = redis.call('ZCARD', abort_set) > 0
local jobs = (#ARGV - FIRST_ARG + 1) / ARGS_PER_JOB
for n = 0, jobs - 1 do
  local k, a = FIRST_KEY + n * KEYS_PER_JOB, FIRST_ARG + n * ARGS_PER_JOB
  local in_progress, job_key, retry_key = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local result_key, tries = KEYS[k + 3], KEYS[k + 4]
  local dependents, ended = KEYS[k + 5], KEYS[k + 6]
  local id, mode, result = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local result_ttl, score = tonumber(ARGV[a + 3]), ARGV[a + 4]
  local keep, record = tonumber(ARGV[a + 5]), ARGV[a + 6]
  local outcome, err = ARGV[a + 7], ARGV[a + 8]
  if record ~= '' and redis.call('RPUSH', tries, record) > kept then
    redis.call('LTRIM', tries, -kept, -1)
  end
  if keep > 0 then redis.call('PEXPIRE', in_progress, keep) end
  if mode == 'done' then
    if result ~= '' then
      if result_ttl > 0 then
        redis.call('SET', result_key, result, 'PX', result_ttl)
      else
        redis.call('SET', result_key, result)
      end
    end
    if keep > 0 then
      redis.call('DEL', job_key, retry_key)
    else
      redis.call('DEL', in_progress, job_key, retry_key)
    end
    if check_abort then redis.call('ZREM', abort_set, id) end
    redis.call('ZREM', queue, id)
    if record == '' then  -- nothing written for this job (its first try, no result kept)
    elseif result == '' then
      redis.call('DEL', tries)  -- no result kept: no job page to show them on
    elseif result_ttl > 0 then
      redis.call('PEXPIRE', tries, result_ttl)
    else
      redis.call('PERSIST', tries)
    end
    if outcome ~= '' then
      -- a completion with its result kept is told by the result itself (enqueue_waiting.lua):
      -- no marker, so the common end costs no key (120 bytes for a day, per job)
      if outcome ~= 'complete' or result == '' then
        local marker_ttl = ended_ttl
        if result ~= '' and result_ttl > 0 then marker_ttl = result_ttl end
        redis.call('SET', ended, outcome .. '|' .. err, 'PX', marker_ttl)
      end
      local children = redis.call('SMEMBERS', dependents)
      for _, child in ipairs(children) do release(child, id, outcome, err, result) end
      if #children > 0 then redis.call('DEL', dependents) end
    end
  else
    redis.call('ZADD', queue, 'XX', score, id)
    redis.call('ZADD', transactional, 'XX', score, id)
    if keep == 0 then redis.call('DEL', in_progress) end
    if mode == 'later' and tonumber(redis.call('GET', retry_key) or '0') > 0 then
      redis.call('DECR', retry_key)
    end
    local until_ms = tonumber(score) - now + extra
    for _, key in ipairs({job_key, retry_key}) do
      local ttl = redis.call('PTTL', key)
      if ttl >= 0 and ttl < until_ms then redis.call('PEXPIRE', key, until_ms) end
    end
    if record ~= '' then redis.call('PEXPIRE', tries, until_ms) end
  end
end
return jobs

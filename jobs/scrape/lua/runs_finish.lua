-- A page job of a run ended for good with an outcome (jobs/scrape/runs.py finish_page); the run
-- ends with its last pending page. A repeated end (a job run again after a crash) changes
-- nothing. With no job id, only checks whether the run has ended.
-- Returns 0 if the run is gone, 2 if this call ended it, else 1.
local info_key = KEYS[1]
local pending_key = KEYS[2]
local pages_key = KEYS[3]
local active_runs_key = KEYS[4]
local job_id = ARGV[1]  -- '' to only check the end
local outcome = ARGV[2]
local finished_at = ARGV[3]  -- ISO time
local run_id = ARGV[4]
local ttl_s = ARGV[5]

if redis.call('EXISTS', info_key) == 0 then return 0 end
if job_id ~= '' then
  redis.call('HSETNX', pages_key, job_id, outcome)
  redis.call('EXPIRE', pages_key, ttl_s)
  redis.call('ZREM', pending_key, job_id)
end
if redis.call('ZCARD', pending_key) == 0 and redis.call('HEXISTS', info_key, 'finished_at') == 0 then
  redis.call('HSET', info_key, 'finished_at', finished_at)
  redis.call('ZREM', active_runs_key, run_id)
  return 2
end
return 1

-- Record a source's run before its first job is enqueued (jobs/scrape/runs.py start_run):
-- its info, its start page pending, the run active and listed. Starting the same run again
-- changes nothing; an exclusive start is refused while another run is active.
-- Returns {1, run id}: started; {0, run id}: that run had started already; {-1, the active
-- run's id}: another run is active.
local info_key = KEYS[1]
local pending_key = KEYS[2]
local active_runs_key = KEYS[3]
local runs_key = KEYS[4]
local run_id = ARGV[1]
local trigger = ARGV[2]  -- 'schedule' or 'manual'
local started_at = ARGV[3]  -- ISO time
local start_ms = ARGV[4]
local job_id = ARGV[5]  -- the start page's job
local force = ARGV[6]  -- '0' or '1'
local exclusive = ARGV[7]  -- '0' or '1'
local ttl_s = ARGV[8]

if redis.call('EXISTS', info_key) == 1 then return {0, run_id} end
if exclusive == '1' then
  local active = redis.call('ZRANGE', active_runs_key, 0, 0)
  if #active > 0 then return {-1, active[1]} end
end
redis.call('HSET', info_key, 'trigger', trigger, 'started_at', started_at, 'job_id', job_id,
           'force', force)
redis.call('ZADD', pending_key, start_ms, job_id)
redis.call('ZADD', active_runs_key, start_ms, run_id)
redis.call('LPUSH', runs_key, run_id)
redis.call('EXPIRE', info_key, ttl_s)
redis.call('EXPIRE', pending_key, ttl_s)
return {1, run_id}

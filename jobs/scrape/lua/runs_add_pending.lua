-- A page job of a run is about to be enqueued (jobs/scrape/runs.py add_pending): it is pending,
-- unless the run is gone or the job already ended (it keeps its outcome).
-- Returns 1 if it was added, else 0.
local info_key = KEYS[1]
local pending_key = KEYS[2]
local pages_key = KEYS[3]
local job_id = ARGV[1]
local now_ms = ARGV[2]

if redis.call('EXISTS', info_key) == 0 or redis.call('HEXISTS', pages_key, job_id) == 1 then
  return 0
end
redis.call('ZADD', pending_key, now_ms, job_id)
return 1

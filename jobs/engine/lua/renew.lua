-- Renew the leases of the jobs one worker runs (jobs/engine/queue.py, renew_leases): each job
-- whose in-progress key still exists keeps it another lease and moves its score in the queue
-- (and in the transactional index, if there) to the lease's new end. A job whose in-progress
-- key is gone has just finished: its score is left alone. Returns 1.
local queue = KEYS[1]
local transactional = KEYS[2]
-- KEYS[3], KEYS[4], ...: the in-progress key of each job, in the order of its id in ARGV
local lease_end = ARGV[1]  -- ms
local lease_ms = ARGV[2]
-- ARGV[3], ARGV[4], ...: the job ids
local FIRST_KEY, FIRST_ID = 3, 3

for i = 0, #ARGV - FIRST_ID do
  local in_progress = KEYS[FIRST_KEY + i]
  local job_id = ARGV[FIRST_ID + i]
  if redis.call('PEXPIRE', in_progress, lease_ms) == 1 then
    redis.call('ZADD', queue, 'XX', lease_end, job_id)
    redis.call('ZADD', transactional, 'XX', lease_end, job_id)
  end
end
return 1

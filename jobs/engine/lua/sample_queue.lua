-- Sample the queue at a monitor flush (jobs/engine/monitor.py, JobMonitor._write_trends): its
-- due jobs and the oldest one's wait, each kept as the largest sample of the minute and of the
-- hour (fields "depth_max" and "age_max_ms" of the minute and hour keys, which get their TTLs).
-- Returns the number of due jobs.
local queue = KEYS[1]
local minute_key = KEYS[2]
local hour_key = KEYS[3]
local now = tonumber(ARGV[1])  -- ms
local minute_ttl_s = ARGV[2]
local hour_ttl_s = ARGV[3]

local function keep_max(key, field, value)
  if value > tonumber(redis.call('HGET', key, field) or '-1') then
    redis.call('HSET', key, field, value)
  end
end

local function sample(key, ttl_s, depth, age)
  keep_max(key, 'depth_max', depth)
  keep_max(key, 'age_max_ms', age)
  redis.call('EXPIRE', key, ttl_s)
end

local depth = redis.call('ZCOUNT', queue, '-inf', now)
local age = 0
if depth > 0 then
  local first = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1)
  age = math.max(0, math.floor(now - tonumber(first[2])))
end
sample(minute_key, minute_ttl_s, depth, age)
sample(hour_key, hour_ttl_s, depth, age)
return depth

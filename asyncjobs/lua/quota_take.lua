-- Charge n units to an hourly token bucket (asyncjobs/quota.py HourlyQuota.take), refilled
-- continuously by Redis's own clock, so that web processes and workers on several hosts share
-- one bucket. Takes n tokens if there are n. With a marker, the first call's answer is kept
-- there and every later call gets it again (a schedule's run is charged once however many
-- workers tick).
-- Returns {1, tokens left} or {0, seconds until n are there} (the second as a string).
local bucket_key = KEYS[1]  -- hash: tokens, at
local marker_key = KEYS[2]  -- absent: the charge is not once-only
local capacity = tonumber(ARGV[1])
local refill = tonumber(ARGV[2])  -- seconds to refill from empty
local n = tonumber(ARGV[3])
local marker_ms = ARGV[4]  -- the marker's life

if marker_key then
  local done = redis.call('GET', marker_key)
  if done then
    local sep = string.find(done, ':', 1, true)
    return {tonumber(string.sub(done, 1, sep - 1)), string.sub(done, sep + 1)}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = capacity / refill
local state = redis.call('HMGET', bucket_key, 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local answer
if tokens < n then
  answer = {0, tostring((n - tokens) / rate)}
else
  tokens = tokens - n
  redis.call('HSET', bucket_key, 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('PEXPIRE', bucket_key, math.ceil((capacity - tokens) / rate * 1000) + 1000)
  answer = {1, tostring(tokens)}
end
if marker_key then
  redis.call('SET', marker_key, answer[1] .. ':' .. answer[2], 'PX', marker_ms)
end
return answer

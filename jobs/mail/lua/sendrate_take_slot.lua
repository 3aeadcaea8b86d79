-- Take the next free sending slot of SMTP_MAX_PER_SECOND (jobs/mail/sendrate.py), by Redis's
-- own clock: one interval after the previous slot, unless it is further away than the longest
-- wait, then none.
-- Returns the wait in us for the slot it took, or -(the wait) if it took none.
local next_slot_key = KEYS[1]
local interval = tonumber(ARGV[1])  -- us between two slots
local max_wait = tonumber(ARGV[2])  -- us

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local slot = math.max(now, tonumber(redis.call('GET', next_slot_key) or '0'))
local wait = slot - now
if wait > max_wait then return -wait end
local ttl_ms = math.ceil((wait + interval) / 1000) + 1000
redis.call('SET', next_slot_key, string.format('%d', slot + interval), 'PX', ttl_ms)
return wait

-- Bytes an owner holds at once (asyncjobs/quota.py HeldBytes), by Redis's own clock. Every call
-- first drops the items that have expired, then does its op, and ends with `keep`: the three
-- keys expire with the last item (so an owner whose items were never released is forgotten
-- once they have expired), or go when there is none.
-- Returns, by op:
--   'hold': {1, total held} once the item is held; {0, ms until enough of the other items have
--     expired for it to fit, total held} when it does not fit now. An item held already (a
--     request tried again) is charged again in place of its first charge.
--   'release': the bytes released (0: it was not held, or had expired).
--   'extend': 1 if the item is held (its expiry moved to at least now + life), else 0.
--   'total': the bytes held.
local items_key = KEYS[1]  -- zset: item -> expiry (ms of Redis's clock)
local sizes_key = KEYS[2]  -- hash: item -> bytes
local total_key = KEYS[3]  -- string: their total
local op = ARGV[1]  -- 'hold', 'release', 'extend' or 'total'
local item = ARGV[2]  -- '' for 'total'
local n = tonumber(ARGV[3])  -- the item's bytes ('hold')
local life = tonumber(ARGV[4])  -- ms ('hold', 'extend')
local limit = tonumber(ARGV[5])  -- bytes the owner may hold ('hold')

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local total = tonumber(redis.call('GET', total_key) or '0')
local function drop(member)
  local size = tonumber(redis.call('HGET', sizes_key, member) or '0')
  redis.call('HDEL', sizes_key, member)
  if redis.call('ZREM', items_key, member) == 1 then
    total = total - size
    return size
  end
  return 0
end
local function keep()
  local last = redis.call('ZRANGE', items_key, -1, -1, 'WITHSCORES')
  if #last == 0 then
    redis.call('DEL', items_key, sizes_key, total_key)
    total = 0
  else
    total = math.max(total, 0)
    redis.call('SET', total_key, total)
    local until_ms = tonumber(last[2]) + 1000
    for _, key in ipairs({items_key, sizes_key, total_key}) do
      redis.call('PEXPIREAT', key, until_ms)
    end
  end
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', items_key, '-inf', now)) do drop(member) end

local function hold()
  local old = 0
  if redis.call('ZSCORE', items_key, item) then
    old = tonumber(redis.call('HGET', sizes_key, item) or '0')
  end
  if total - old + n <= limit then
    drop(item)
    redis.call('ZADD', items_key, now + life, item)
    redis.call('HSET', sizes_key, item, n)
    total = total + n
    keep()
    return {1, total}
  end
  local need, freed, wait = total - old + n - limit, 0, life
  local held = redis.call('ZRANGE', items_key, 0, -1, 'WITHSCORES')
  for i = 1, #held, 2 do
    if held[i] ~= item then
      freed = freed + tonumber(redis.call('HGET', sizes_key, held[i]) or '0')
      if freed >= need then
        wait = tonumber(held[i + 1]) - now
        break
      end
    end
  end
  keep()
  return {0, wait, total}
end

local function extend()
  local expiry = redis.call('ZSCORE', items_key, item)
  if expiry and tonumber(expiry) < now + life then
    redis.call('ZADD', items_key, now + life, item)
  end
  keep()
  if expiry then return 1 end
  return 0
end

local function release()
  local freed = drop(item)
  keep()
  return freed
end

local function held_total()
  keep()
  return total
end

local ops = {hold = hold, release = release, extend = extend, total = held_total}
return ops[op]()

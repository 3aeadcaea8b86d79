-- The fetched_at of every version of a document but the newest (index 0), without sending their
-- texts over (jobs/housekeeping/cleanup.py).
-- Returns a list, oldest last: each version's fetched_at, '' where it is unreadable.
local versions_key = KEYS[1]

local out = {}
for i, raw in ipairs(redis.call('LRANGE', versions_key, 1, -1)) do
  local ok, v = pcall(cjson.decode, raw)
  if ok and type(v) == 'table' and type(v.fetched_at) == 'string' then
    out[i] = v.fetched_at
  else
    out[i] = ''
  end
end
return out

-- Remove the versions of a document (never index 0, the newest) whose fetched_at is one of ARGV
-- (jobs/housekeeping/cleanup.py). Matching by value, not by position, keeps this right when a
-- scrape pushed a new version since cleanup_version_times.lua ran.
-- Returns how many versions were removed.
local versions_key = KEYS[1]
local drop_times = ARGV  -- every entry: a fetched_at to drop (one or more)

local drop = {}
for _, t in ipairs(drop_times) do drop[t] = true end
local removed = 0
for _, raw in ipairs(redis.call('LRANGE', versions_key, 1, -1)) do
  local ok, v = pcall(cjson.decode, raw)
  if ok and type(v) == 'table' and type(v.fetched_at) == 'string' and drop[v.fetched_at] then
    removed = removed + redis.call('LREM', versions_key, -1, raw)
  end
end
return removed

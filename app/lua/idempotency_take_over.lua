-- Take over an Idempotency-Key's record that an earlier try of the same request left in a given
-- state (app/idempotency.py): replace it with a new record and life.
-- Returns 1 if replaced, 0 if the record is gone or in another state.
local record_key = KEYS[1]
local from_state = ARGV[1]
local new_record = ARGV[2]
local ttl_s = ARGV[3]

local record = redis.call('GET', record_key)
if not record or cjson.decode(record)['state'] ~= from_state then return 0 end
redis.call('SET', record_key, new_record, 'EX', ttl_s)
return 1

-- Record that a message was sent (jobs/mail/email.py record_sent): its sent marker and, for a
-- message of a newsletter batch, the batch's progress (sent, no longer failed).
-- Returns 1.
local sent_key = KEYS[1]
local batch_sent_key = KEYS[2]  -- absent outside a batch
local batch_failed_key = KEYS[3]  -- absent outside a batch
local message_id = ARGV[1]
local ttl_s = ARGV[2]
local in_batch = ARGV[3]  -- '1' when the message belongs to a batch

redis.call('SET', sent_key, '1', 'EX', ttl_s)
if in_batch == '1' then
  redis.call('SADD', batch_sent_key, message_id)
  redis.call('SREM', batch_failed_key, message_id)
  redis.call('EXPIRE', batch_sent_key, ttl_s)
end
return 1

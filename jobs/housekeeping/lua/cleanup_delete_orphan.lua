-- Delete a document of a deleted source (jobs/housekeeping/cleanup.py), only if it still belongs
-- to that source and the source is still gone: between the caller's read and this call the URL
-- may have been re-scraped ad hoc or the source re-added.
-- Returns 1 if the document was deleted, else 0.
local doc_key = KEYS[1]
local versions_key = KEYS[2]
local doc_index_key = KEYS[3]
local changed_index_key = KEYS[4]
local sources_key = KEYS[5]
local source_docs_key = KEYS[6]
local doc_id = ARGV[1]
local source_id = ARGV[2]

local sid = redis.call('HGET', doc_key, 'source_id')
if not sid or sid ~= source_id or redis.call('SISMEMBER', sources_key, sid) == 1 then
  return 0
end
redis.call('DEL', doc_key, versions_key, source_docs_key)
redis.call('ZREM', doc_index_key, doc_id)
redis.call('ZREM', changed_index_key, doc_id)
return 1

-- Store a fetch of a URL (jobs/scrape/documents.py save_document). The same content as stored:
-- refresh the check time, validators and the fields a fetch derives. New content: replace the
-- document's hash and push a version, keeping the newest few.
-- A page fetched for a source belongs to it whether it changed or not (a document may belong to
-- several sources: each has its set); its `source_id` names the first source that has it.
-- Returns 1 when the content changed (a new version), else 0.
local doc_key = KEYS[1]
local versions_key = KEYS[2]
local doc_index_key = KEYS[3]
local changed_index_key = KEYS[4]
local source_docs_key = KEYS[5]  -- absent when the fetch is for no source
local content_hash = ARGV[1]
local fetched_at = ARGV[2]  -- ISO time
local fetch_ms = ARGV[3]
local etag = ARGV[4]  -- '' for none
local last_modified = ARGV[5]  -- '' for none
local fetch_time = ARGV[6]  -- unix s
local doc_id = ARGV[7]
local version_json = ARGV[8]
local keep_versions = tonumber(ARGV[9])
local source_id = ARGV[10]  -- '' for none
local refreshed = tonumber(ARGV[11])
-- ARGV[12 .. 11 + refreshed]: field, value, ... a fetch derives (extraction, metadata, links),
-- set even when the content is the same so they always match the last fetch; the rest of ARGV:
-- field, value, ... of the whole hash.

if redis.call('HGET', doc_key, 'content_hash') == content_hash then
  redis.call('HSET', doc_key, 'fetched_at', fetched_at, 'fetch_ms', fetch_ms)
  if etag ~= '' then redis.call('HSET', doc_key, 'etag', etag) end
  if last_modified ~= '' then redis.call('HSET', doc_key, 'last_modified', last_modified) end
  if refreshed > 0 then redis.call('HSET', doc_key, unpack(ARGV, 12, 11 + refreshed)) end
  if source_id ~= '' then
    redis.call('HSETNX', doc_key, 'source_id', source_id)
    redis.call('SADD', source_docs_key, doc_id)
  end
  redis.call('ZADD', doc_index_key, fetch_time, doc_id)
  return 0
end
redis.call('DEL', doc_key)
redis.call('HSET', doc_key, unpack(ARGV, 12 + refreshed))
redis.call('LPUSH', versions_key, version_json)
redis.call('LTRIM', versions_key, 0, keep_versions - 1)
redis.call('ZADD', doc_index_key, fetch_time, doc_id)
redis.call('ZADD', changed_index_key, fetch_time, doc_id)
if source_id ~= '' then redis.call('SADD', source_docs_key, doc_id) end
return 1

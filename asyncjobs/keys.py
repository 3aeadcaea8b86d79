"""Every Redis key asyncjobs writes, in one place (as arq keeps its own in `arq.constants`).

arq's keys (`arq:queue`, `arq:job:<id>`, `arq:result:<id>`, `arq:in-progress:<id>`,
`arq:retry:<id>`, `arq:queue:health-check`, `arq:abort`) come from `arq.constants`, through
asyncjobs/arqcompat.py; everything below is this project's, all under `asyncjobs:` except the
queue's wake-up list, which sits beside its queue. A prefix ends in ":" and is followed by an id;
a `*_key` function builds a composite one.
"""

from __future__ import annotations

from typing import Literal

PREFIX = "asyncjobs:"

# The id of a source, a schedule, a document, a scrape batch, an export or an image job (each
# a key's suffix, some a file's or folder's name): 32 lowercase hex digits, a uuid4().hex or a
# digest's first half. No anchors, no groups: it also goes inside aiohttp route patterns.
HEX_ID_PATTERN = r"[0-9a-f]{32}"

# --- API (app/) ---------------------------------------------------------------------------
RATE_KEY_PREFIX = PREFIX + "rate:"  # + key name:window -> requests in the window (quota.py)
QUOTA_KEY_PREFIX = PREFIX + "quota:"  # + unit:key id -> a key's quota (asyncjobs/quota.py):
# messages:<id> hash {tokens, at}; upload-bytes:<id> zset of uploads, :sizes, :total
IDEMPOTENCY_KEY_PREFIX = PREFIX + "idem:"  # + sha256(scope) -> the first answer
SESSION_KEY_PREFIX = PREFIX + "session:"  # + session id -> dashboard session hash
SCRAPE_BATCH_KEY_PREFIX = PREFIX + "scrape-batch:"  # + batch id -> JSON [{job_id, url}]


# --- Engine and monitor (jobs/engine/) ------------------------------------------------------
def wake_key(queue: str) -> str:
    """A list a waiting worker blocks on (BLPOP); it never holds more than one item."""
    return f"{queue}:wake"


def transactional_key(queue: str) -> str:
    """Zset: the ids of the queue's transactional jobs (a hint the claim script checks)."""
    return f"{queue}:transactional"


def bulk_turn_key(queue: str) -> str:
    """Counter: where the claim script is in its cycle of transactional and bulk claims."""
    return f"{queue}:bulk-turn"


STATS_KEY_PREFIX = PREFIX + "stats:"
COUNTERS_KEY = STATS_KEY_PREFIX + "counters"  # "<metric>|<label>" -> count
DURATION_KEY = STATS_KEY_PREFIX + "duration"  # "<function>|<bucket>" -> count, "|sum", "|count"
LATENCY_KEY = STATS_KEY_PREFIX + "latency"  # due (enqueued, retry, postponement) -> start
MINUTE_KEY_PREFIX = STATS_KEY_PREFIX + "minute:"  # + epoch minute -> {completed, failed}
# minute and hour keys also hold "<outcome>|<function>" counts, "wait|<function>|<bucket>" and
# "run|<function>|<bucket>" histograms, and the queue sampled: "depth_max", "age_max_ms"
HOUR_KEY_PREFIX = STATS_KEY_PREFIX + "hour:"  # + epoch hour -> the same fields, for a day
RUNNING_KEY = PREFIX + "running"  # zset job id -> start ms
RECENT_KEY = PREFIX + "recent"  # zset job id -> finish ms, while arq keeps the result
WORKERS_KEY = PREFIX + "workers"  # set of worker ids; details at WORKER_KEY_PREFIX + id
WORKER_KEY_PREFIX = PREFIX + "worker:"  # + worker id -> {started_at, last_seen, ...}
CRON_KEY_PREFIX = PREFIX + "cron:"  # + cron name -> {last_run, last_result, runs}
PROGRESS_KEY_PREFIX = PREFIX + "progress:"  # + job id -> {done, total, step}
RETRYING_KEY_PREFIX = PREFIX + "retrying:"  # + job id -> {error, try, next_try_ms}
# + job id -> list of JSON {try, started_at, ended_at, worker, outcome, error}, oldest first,
# the last TRIES_KEPT; written with the try's finish, expiring with the job's result
TRIES_KEY_PREFIX = PREFIX + "tries:"
TRIES_KEPT = 50
DEAD_KEY_PREFIX = PREFIX + "dead:"  # + job id -> JSON dead-letter entry
DEAD_INDEX_KEY = PREFIX + "dead"  # zset job id -> failure time
UPLOAD_KEY_PREFIX = PREFIX + "upload:"  # + upload id -> an uploaded image, until its job ends
CALLBACK_KEY_PREFIX = PREFIX + "callback:"  # + job id -> JSON: its webhook's delivery
# Jobs that wait for others (`after`, `then`, a batch's callback; jobs/engine/dependencies.py):
# + job id -> hash of a waiting job: pending, total, counts by outcome, state (waiting,
# released, cancelled), what ended it if cancelled, the queue to release it into
WAITS_KEY_PREFIX = PREFIX + "waits:"
DEPENDENTS_KEY_PREFIX = PREFIX + "dependents:"  # + job id -> set of the jobs waiting on it
# + job id -> "<outcome>|<error>": how a finished job ended, kept as long as its result, so an
# `after` naming a job that has ended already resolves at its enqueue
ENDED_KEY_PREFIX = PREFIX + "ended:"


def waiting_key(queue: str) -> str:
    """Zset job id -> enqueue ms: the queue's jobs still waiting for others, which are in no
    other index until released (the dashboard lists them from here). Written by
    enqueue_waiting.lua, emptied by finish.lua's release and by an abort; an entry older than
    a waiting job lives (WAIT_TTL_MS) is stale and dropped when read."""
    return f"{PREFIX}waiting:{queue}"


def unique_key(scope: str, job_type: str, key_digest: str) -> str:
    """A job's `unique_key`, per owner (API key id, "-" for none) and job type: the id of the
    job holding it, for its window (jobs/engine/unique.py, enqueue.lua)."""
    return f"{PREFIX}unique:{scope}:{job_type}:{key_digest}"


# --- Mail (jobs/mail/) -----------------------------------------------------------------------
SENT_KEY_PREFIX = PREFIX + "sent:"  # + message id -> sent marker (effectively-once delivery)
# + newsletter id -> {total, aborted, callback, domain}; :sent, :failed, :aborted (sets of
# Message-IDs: jobs/mail/lua/batch_record.lua)
MAIL_BATCH_KEY_PREFIX = PREFIX + "batch:"
BATCH_ABORTED_FIELD = "aborted"  # in a batch's hash: DELETE /jobs/<newsletter id> stopped it
SMTP_NEXT_SLOT_KEY = PREFIX + "smtp:next-slot"  # microseconds (Redis time) of the next free slot
# + message id -> {address: JSON answer}: each recipient's last SMTP answer, kept while some
# recipients lack the message (its sent marker then says "partial"; jobs/mail/outcomes.py)
RECIPIENTS_KEY_PREFIX = PREFIX + "rcpt:"
SMTP_PROBLEM_KEY = PREFIX + "smtp:problem"  # {reason, since}: an SMTP configuration failure


def mail_batch_key(batch_id: str, outcome: Literal["sent", "failed", "aborted"]) -> str:
    return f"{MAIL_BATCH_KEY_PREFIX}{batch_id}:{outcome}"


# --- Scraping (jobs/scrape/) -----------------------------------------------------------------
HOST_KEY_PREFIX = PREFIX + "host:"  # + host -> :leases, :next, :tail, :turn:<job id> (politeness)
ROBOTS_KEY_PREFIX = PREFIX + "robots:"  # + origin -> cached robots.txt
# HTTP jobs' limits per target (jobs/http/limits.py), kept as politeness keeps a host's:
# + "host:<host:port>" or "group:<limit_group>" -> :leases, :next, :tail, :turn:<job id>
HTTP_LIMIT_KEY_PREFIX = PREFIX + "http-limit:"
DOC_KEY_PREFIX = PREFIX + "doc:"  # + doc id -> hash: the latest snapshot of the URL
DOC_INDEX_KEY = PREFIX + "docs"  # zset doc id -> last fetch time (unix seconds)
DOC_CHANGED_KEY = PREFIX + "docs:changed"  # zset doc id -> time its content last changed
SOURCES_KEY = PREFIX + "sources"  # set of source ids
SOURCE_KEY_PREFIX = PREFIX + "source:"  # + source id -> JSON definition
SCRAPE_FAILURES_KEY = PREFIX + "scrape:failures"  # hash: reason -> scrapes (no source) failed


def doc_versions_key(doc_id: str) -> str:
    """List, newest first: the last K distinct contents (JSON)."""
    return f"{DOC_KEY_PREFIX}{doc_id}:versions"


def source_docs_key(source_id: str) -> str:
    """Set: every document the source reached (a document may belong to several)."""
    return f"{SOURCE_KEY_PREFIX}{source_id}:docs"


def source_failures_key(source_id: str) -> str:
    """Hash: failure reason -> count."""
    return f"{SOURCE_KEY_PREFIX}{source_id}:failures"


def source_run_key(source_id: str, period: int) -> str:
    """The run of a period: taken by one worker only."""
    return f"{SOURCE_KEY_PREFIX}{source_id}:run:{period}"


def source_pages_key(source_id: str, period: int) -> str:
    """How many pages the run has taken into its budget (the start page not counted)."""
    return f"{SOURCE_KEY_PREFIX}{source_id}:pages:{period}"


def source_seen_key(source_id: str, period: int) -> str:
    """The links the run has met: each takes a place in the budget once."""
    return f"{SOURCE_KEY_PREFIX}{source_id}:seen:{period}"


def source_runs_key(source_id: str) -> str:
    """List, newest first: the ids of the last runs (a run's id is its period)."""
    return f"{SOURCE_KEY_PREFIX}{source_id}:runs"


def source_run_info_key(source_id: str, period: int) -> str:
    """Hash: a run's trigger, start, end and first job."""
    return f"{SOURCE_KEY_PREFIX}{source_id}:runs:{period}"


def source_run_pending_key(source_id: str, period: int) -> str:
    """Zset job id -> enqueued ms: the run's page jobs not finished yet."""
    return f"{SOURCE_KEY_PREFIX}{source_id}:runs:{period}:pending"


def source_run_pages_key(source_id: str, period: int) -> str:
    """Hash job id -> outcome (changed, unchanged, not_modified, failed:<reason>...)."""
    return f"{SOURCE_KEY_PREFIX}{source_id}:runs:{period}:pages"


def source_active_runs_key(source_id: str) -> str:
    """Zset run id -> start ms: the source's runs in progress."""
    return f"{SOURCE_KEY_PREFIX}{source_id}:active-runs"


# --- Schedules (jobs/schedules.py) ---------------------------------------------------------
SCHEDULES_KEY = PREFIX + "schedules"  # set of schedule ids
SCHEDULE_KEY_PREFIX = PREFIX + "schedule:"  # + schedule id -> JSON definition


def schedule_runs_key(schedule_id: str) -> str:
    """List, newest first: the last runs (JSON: period, enqueued_at, job ids)."""
    return f"{SCHEDULE_KEY_PREFIX}{schedule_id}:runs"


def schedule_run_key(schedule_id: str, period: int) -> str:
    """Marker: the period's run is enqueued (or skipped)."""
    return f"{SCHEDULE_KEY_PREFIX}{schedule_id}:run:{period}"


def schedule_charge_key(schedule_id: str, period: int) -> str:
    """The period's run's charge to its owner's quota, once: "1:<left>" or "0:<wait s>"."""
    return f"{SCHEDULE_KEY_PREFIX}{schedule_id}:charge:{period}"


# --- Housekeeping (jobs/housekeeping/) -------------------------------------------------------
REPORT_KEY = PREFIX + "report:latest"  # JSON: the last analysis report

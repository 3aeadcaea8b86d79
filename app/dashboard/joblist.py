"""The dashboard's jobs list: every job Redis still holds, searched and paged with bounded work.

Four indexes name the jobs: the running set, the queue (a zset by due time), the waiting index
(jobs waiting for others, `asyncjobs.keys.waiting_key`, by enqueue time: they are in no other
index until released) and the finished index (`RECENT_KEY`, by finish time, kept as long as
arq keeps the results). A page walks one index from a cursor, reads the jobs' records (arq's
result or job key) a chunk at a time in one pipeline per chunk, keeps those that match, and
stops at PAGE_ROWS rows or after SCAN_LIMIT records, whichever comes first: a search costs at
most SCAN_LIMIT reads, however many jobs there are, and the page then links to the next
stretch ("older").

A newsletter and its messages (`<newsletter id>-<n>`, with a `batch_id` argument) and a
multi-URL scrape's jobs (`<batch id>-<n>`) are listed as one row per batch; `?batch=<id>`
lists a batch's members by their index.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from arq.connections import ArqRedis
from arq.jobs import DeserializationError, JobDef, JobResult, deserialize_job, deserialize_result
from redis.asyncio import Redis

from app.dashboard.data import JOB_STATES, WINDOWS
from app.http import ANY_JOB_ID_PATTERN
from app.redaction import redact
from asyncjobs.arqcompat import in_progress_key_prefix, job_key_prefix, result_key_prefix
from asyncjobs.jobstate import FINISHED, JobState
from asyncjobs.keys import (
    HEX_ID_PATTERN,
    RECENT_KEY,
    RUNNING_KEY,
    SCRAPE_BATCH_KEY_PREFIX,
    waiting_key,
)
from asyncjobs.registry import get_job_type
from jobs.engine.dependencies import drop_expired_waiting
from jobs.mail.newsletter import batch_progress
from jobs.values import as_text

PAGE_ROWS = 50  # rows on a page (a batch is one row)
SCAN_LIMIT = 1000  # job records one request reads at most
CHUNK = 100  # records read per round trip
RUNNING_SHOWN = 200  # running jobs on the first page (they are few: one per worker slot)
WAITING_SHOWN = 20  # waiting jobs read for the unfiltered first page (all: status=waiting)
MEMBERS_SHOWN = 20  # a batch's members listed inside its row
VALUE_CHARS = 60  # each summary value, truncated
# A batch member's id: its batch's (32 hex, from app.idempotency.new_job_id) and its index.
MEMBER_ID = re.compile(rf"({HEX_ID_PATTERN})-(\d+)")
ID_PATTERN = re.compile(ANY_JOB_ID_PATTERN)
Index = Literal["queue", "waiting", "finished"]


@dataclass(frozen=True)
class JobQuery:
    """What the form asks for; unknown values mean "any" (a filter form is worth no 400)."""

    q: str = ""
    status: str = ""
    function: str = ""
    window: str = ""
    batch: str = ""
    after: str = ""  # the cursor: where the previous page stopped

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> JobQuery:
        status, window = query.get("status", ""), query.get("window", "")
        batch, after = query.get("batch", ""), query.get("after", "")
        return cls(
            q=query.get("q", "").strip()[:200],
            status=status if status in JOB_STATES else "",
            function=query.get("function", "")[:100],
            window=window if window in WINDOWS else "",
            batch=batch if re.fullmatch(HEX_ID_PATTERN, batch) else "",
            after=after if Cursor.parse(after) or after.isdigit() else "",
        )

    @property
    def filtered(self) -> bool:
        return bool(self.q or self.status or self.function or self.window)

    def params(self, **changes: str) -> dict[str, str]:
        """The query string of a link to another page of the same search."""
        fields = {k: getattr(self, k) for k in ("q", "status", "function", "window", "batch")}
        return {k: v for k, v in (fields | changes).items() if v}

    def matches(self, job: JobRow, now: datetime) -> bool:
        if self.status and job.status != self.status:
            return False
        if self.function and job.function != self.function:
            return False
        if self.window and (job.enqueued is None or job.enqueued < now - WINDOWS[self.window]):
            return False
        return not self.q or self.q.lower() in job.haystack


@dataclass(frozen=True)
class Cursor:
    """A position in an index: the score and id of the last job a page read."""

    score: float
    job_id: str

    def __str__(self) -> str:
        return f"{self.score!r}~{self.job_id}"

    @classmethod
    def parse(cls, text: str) -> Cursor | None:
        score, _, job_id = text.partition("~")
        try:
            value = float(score)
        except ValueError:
            return None
        return cls(value, job_id) if ID_PATTERN.fullmatch(job_id) else None


@dataclass
class JobRow:
    kind: ClassVar[str] = "job"
    job_id: str
    function: str
    status: JobState
    tries: int | None
    enqueued: datetime | None
    finished: datetime | None
    summary: list[tuple[str, str]]
    haystack: str  # what a search looks in: id, function, status, redacted arguments
    batch: str | None  # the batch it belongs to (a newsletter is its own)


@dataclass
class BatchRow:
    kind: ClassVar[str] = "batch"
    batch_id: str
    parent: JobRow | None = None  # the newsletter job itself, when listed
    members: list[JobRow] = field(default_factory=list)
    total: int | None = None  # its size, when the batch says
    progress: str = ""  # a newsletter's sent/failed/pending

    @property
    def counts(self) -> list[tuple[str, int]]:
        by_status = Counter(m.status for m in self.members)
        return [(s, by_status[s]) for s in JOB_STATES if by_status[s]]

    @property
    def function(self) -> str:
        if self.parent is not None:
            return self.parent.function
        return self.members[0].function if self.members else ""

    @property
    def newest(self) -> datetime | None:
        times = [t for j in self.jobs() if (t := j.finished or j.enqueued) is not None]
        return max(times, default=None)

    def jobs(self) -> list[JobRow]:
        return ([self.parent] if self.parent else []) + self.members


Row = JobRow | BatchRow


@dataclass
class JobPage:
    rows: list[Row]
    scanned: int  # job records read
    next_cursor: str | None  # the "older" link's cursor, if there is more
    limited: bool  # stopped by SCAN_LIMIT rather than by a full page
    oldest: datetime | None = None  # the oldest job time the scan reached


# -- reading records --


async def read_rows(redis: Redis, queue_name: str, ids: list[str]) -> list[JobRow | None]:
    """Jobs' rows in one round trip: their result once finished, else their definition.
    None for a job Redis no longer holds (its result expired)."""
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.get(result_key_prefix + job_id)
            pipe.get(job_key_prefix + job_id)
            pipe.exists(in_progress_key_prefix + job_id)
            pipe.zscore(queue_name, job_id)
        replies = await pipe.execute()
    now_ms = datetime.now(UTC).timestamp() * 1000
    rows = []
    for i, job_id in enumerate(ids):
        raw_result, raw_job, running, score = replies[4 * i : 4 * i + 4]
        rows.append(_row(job_id, raw_result, raw_job, bool(running), score, now_ms))
    return rows


def _row(
    job_id: str,
    raw_result: bytes | None,
    raw_job: bytes | None,
    running: bool,
    score: float | None,
    now_ms: float,
) -> JobRow | None:
    try:
        if raw_result is not None:
            result = deserialize_result(raw_result)
            return _make_row(job_id, result, _finished_status(result), result.finish_time)
        if raw_job is not None:
            status = JobState.IN_PROGRESS if running else JobState.QUEUED
            if not running and score is not None and score > now_ms:
                status = JobState.DEFERRED
            elif not running and score is None:  # in no queue: waiting for other jobs
                status = JobState.WAITING
            return _make_row(job_id, deserialize_job(raw_job), status, None)
    except DeserializationError:
        return None
    return None


def _finished_status(result: JobResult) -> JobState:
    if result.success:
        return JobState.COMPLETE
    if isinstance(result.result, asyncio.CancelledError):
        return JobState.ABORTED
    return JobState.FAILED


def _make_row(job_id: str, job: JobDef, status: JobState, finished: datetime | None) -> JobRow:
    arguments: dict[str, Any] = redact(dict(job.kwargs))  # a search must not find secrets
    text = json.dumps(arguments, default=str, ensure_ascii=False)
    return JobRow(
        job_id=job_id,
        function=job.function,
        status=status,
        tries=job.job_try,
        enqueued=job.enqueue_time,
        finished=finished,
        summary=summarize(job.function, arguments),
        haystack=f"{job_id} {job.function} {status} {text}".lower(),
        batch=batch_of(job_id, job.function, arguments),
    )


def batch_of(job_id: str, function: str, arguments: Mapping[str, Any]) -> str | None:
    if function == "send_newsletter":
        return job_id
    batch = arguments.get("batch_id")
    if isinstance(batch, str) and batch:
        return batch
    member = MEMBER_ID.fullmatch(job_id)
    return member.group(1) if member else None


# -- the summary column --


def summarize(function: str, arguments: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The fields the job type's registry entry shows (`shown`), as (label, short text)."""
    job_type = get_job_type(function)
    if job_type is None:
        return []
    fields = []
    for path in job_type.shown:
        value = _lookup(arguments, path.split("."))
        if value is not None and value != "":
            fields.append((path.rpartition(".")[2], _short(value)))
    return fields


def _lookup(value: Any, parts: list[str]) -> Any:
    for part in parts:
        value = value.get(part) if isinstance(value, Mapping) else getattr(value, part, None)
        if value is None:
            return None
    return value


def _short(value: Any) -> str:
    many = isinstance(value, list | tuple)
    text = ", ".join(_plain(v) for v in value) if many else _plain(value)
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 1] + "…"


def _plain(value: Any) -> str:
    if isinstance(value, Mapping) and "email" in value:  # an address as {name, email}
        name = value.get("name")
        return f"{name} <{value['email']}>" if name else str(value["email"])
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, default=str, ensure_ascii=False)


# -- walking the indexes --


async def index_after(
    redis: Redis, key: str, index: Index, cursor: Cursor | None, count: int
) -> list[tuple[str, float]]:
    """The next `count` (id, score) of an index after `cursor`: the queue earliest first, the
    waiting and the finished newest first. By score, so a page stays put while new jobs
    arrive; among equal scores Redis orders by id, which the cursor's id places."""
    newest_first = index != "queue"
    skip = 0
    while True:
        if newest_first:
            top = "+inf" if cursor is None else cursor.score
            raw = await redis.zrevrangebyscore(
                key, top, "-inf", start=skip, num=count, withscores=True
            )
        else:
            low = "-inf" if cursor is None else cursor.score
            raw = await redis.zrangebyscore(
                key, low, "+inf", start=skip, num=count, withscores=True
            )
        items = [(as_text(member), float(score)) for member, score in raw]
        kept = [item for item in items if cursor is None or _beyond(item, cursor, newest_first)]
        if kept or len(items) < count:
            return kept[:count]
        skip += count  # a run of equal scores already seen: look past it


def _beyond(item: tuple[str, float], cursor: Cursor, newest_first: bool) -> bool:
    job_id, score = item
    if score != cursor.score:
        return True
    return job_id < cursor.job_id if newest_first else job_id > cursor.job_id


class _Collector:
    """Rows in the order met, a batch's jobs gathered into its one row."""

    def __init__(self, query: JobQuery, group: bool) -> None:
        self.query, self.group = query, group
        self.rows: list[Row] = []
        self.batches: dict[str, BatchRow] = {}
        self.now = datetime.now(UTC)

    def full(self) -> bool:
        return len(self.rows) >= PAGE_ROWS

    def would_add_row(self, job: JobRow) -> bool:
        return not (self.group and job.batch in self.batches)

    def add(self, job: JobRow) -> None:
        if not self.group or job.batch is None:
            self.rows.append(job)
            return
        batch = self.batches.get(job.batch)
        if batch is None:
            batch = self.batches[job.batch] = BatchRow(job.batch)
            self.rows.append(batch)
        if job.job_id == job.batch:
            batch.parent = job
        else:
            batch.members.append(job)


async def scan(
    redis: Redis, queue_name: str, query: JobQuery, index: Index, collector: _Collector
) -> JobPage:
    """Read the index from the query's cursor until the page is full or SCAN_LIMIT records are
    read; a queued job met in the finished index (a retry) is left to the queue's part."""
    key = {"queue": queue_name, "waiting": waiting_key(queue_name), "finished": RECENT_KEY}[index]
    cursor = Cursor.parse(query.after)
    scanned, oldest = 0, None
    while scanned < SCAN_LIMIT:
        items = await index_after(redis, key, index, cursor, min(CHUNK, SCAN_LIMIT - scanned))
        if not items:
            return JobPage(collector.rows, scanned, None, False, oldest)
        rows = await read_rows(redis, queue_name, [job_id for job_id, _ in items])
        for (job_id, score), row in zip(items, rows, strict=True):
            wanted = row is not None and _in_index(row, index) and query.matches(row, collector.now)
            if wanted and row is not None:
                if collector.full() and collector.would_add_row(row):
                    return JobPage(collector.rows, scanned, str(cursor), False, oldest)
                collector.add(row)
            scanned += 1
            cursor = Cursor(score, job_id)
            oldest = datetime.fromtimestamp(score / 1000, UTC)
    more = bool(await index_after(redis, key, index, cursor, 1))  # else no "older" link
    return JobPage(collector.rows, scanned, str(cursor) if more else None, more, oldest)


def _in_index(row: JobRow, index: Index) -> bool:
    if index == "waiting":  # (a job released since its id was read is left to the queue's)
        return row.status == JobState.WAITING
    return (row.status in FINISHED) == (index == "finished")


def _index_of(status: str) -> Index:
    if status in (JobState.QUEUED, JobState.DEFERRED):
        return "queue"
    return "waiting" if status == JobState.WAITING else "finished"


async def list_page(redis: ArqRedis, queue_name: str, query: JobQuery) -> JobPage:
    """One page of the jobs list. The first page starts with the running jobs, then (with no
    status asked for) the newest WAITING_SHOWN waiting ones; then the queue when the status
    asked for is queued or deferred, the waiting index for waiting, else the finished jobs."""
    if query.batch:
        return await batch_page(redis, queue_name, query)
    collector = _Collector(query, group=True)
    if not query.after and query.status in ("", JobState.IN_PROGRESS):
        await _add_running(redis, queue_name, query, collector)
    if not query.after and not query.status:
        await _add_waiting(redis, queue_name, query, collector)
    index = _index_of(query.status)
    if index == "waiting":
        async with redis.pipeline(transaction=False) as pipe:
            drop_expired_waiting(pipe, queue_name)
            await pipe.execute()
    if query.status == JobState.IN_PROGRESS:
        page = JobPage(collector.rows, 0, None, False)
    else:
        page = await scan(redis, queue_name, query, index, collector)
    await describe_batches(redis, collector.batches.values())
    return page


async def _add_running(
    redis: Redis, queue_name: str, query: JobQuery, collector: _Collector
) -> None:
    ids = [as_text(i) for i in await redis.zrevrange(RUNNING_KEY, 0, RUNNING_SHOWN - 1)]
    for row in await read_rows(redis, queue_name, ids):
        if (
            row is not None
            and row.status == JobState.IN_PROGRESS
            and query.matches(row, collector.now)
        ):
            collector.add(row)


async def _add_waiting(
    redis: Redis, queue_name: str, query: JobQuery, collector: _Collector
) -> None:
    """The newest waiting jobs, for the unfiltered first page (status=waiting lists them all)."""
    async with redis.pipeline(transaction=False) as pipe:
        drop_expired_waiting(pipe, queue_name)
        pipe.zrevrange(waiting_key(queue_name), 0, WAITING_SHOWN - 1)
        _, raw = await pipe.execute()
    for row in await read_rows(redis, queue_name, [as_text(i) for i in raw]):
        if row is not None and row.status == JobState.WAITING and query.matches(row, collector.now):
            collector.add(row)


# -- batches --


async def describe_batches(redis: Redis, batches: Any) -> None:
    """Each batch's size and, for a newsletter, its progress (one small read per batch)."""
    listed = list(batches)
    if not listed:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for batch in listed:
            pipe.get(SCRAPE_BATCH_KEY_PREFIX + batch.batch_id)
        records = await pipe.execute()
    progresses = await asyncio.gather(*(batch_progress(redis, b.batch_id) for b in listed))
    for batch, record, progress in zip(listed, records, progresses, strict=True):
        if record is not None:
            batch.total = len(json.loads(record))
        if progress is not None:
            batch.total = progress.total
            batch.progress = (
                f"{progress.sent} sent, {progress.failed} failed, {progress.pending} pending"
            )


async def batch_members(redis: Redis, batch_id: str) -> list[str] | None:
    """A scrape batch's job ids as it recorded them; None for a newsletter (by index)."""
    record = await redis.get(SCRAPE_BATCH_KEY_PREFIX + batch_id)
    if record is None:
        return None
    return [entry["job_id"] for entry in json.loads(record)]


async def batch_page(redis: ArqRedis, queue_name: str, query: JobQuery) -> JobPage:
    """A batch's members in index order, PAGE_ROWS a page (`after` is the next index)."""
    start = int(query.after or 0)
    batch = BatchRow(query.batch)
    await describe_batches(redis, [batch])
    recorded = await batch_members(redis, query.batch)
    total = batch.total if batch.total is not None else start + PAGE_ROWS
    ids = (recorded or [f"{query.batch}-{n}" for n in range(total)])[start : start + PAGE_ROWS]
    if start == 0:
        ids.insert(0, query.batch)  # the newsletter job itself
    collector = _Collector(query, group=False)
    for row in await read_rows(redis, queue_name, ids):
        if row is not None and query.matches(row, collector.now):
            collector.add(row)
    end = start + PAGE_ROWS
    more = end < total if batch.total is not None else bool(collector.rows)
    return JobPage(collector.rows, len(ids), str(end) if more else None, False)

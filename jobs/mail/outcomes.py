"""Each recipient's part of one email: who has it, who gets it on the next try, who never will.

An SMTP server answers every RCPT TO on its own: 2xx (accepted), 4xx (deferred: ask again
later) or 5xx (refused for good), so a message can be done for some recipients and not for
others. Each recipient's last answer is kept in Redis under the message's id
(RECIPIENTS_KEY_PREFIX, as long as the sent marker), written as the sent marker is: once the
server has taken the message and before its connection carries anything else. So:

- an accepted recipient never gets the message again, whichever job of the message runs;
- a retry sends the message (the same Message-ID) to the deferred recipients only;
- a recipient refused for good is not tried again by the job that was refused; a new job of
  the message (the retry of its dead letter, once someone fixed the mailbox) tries it again.

A message every recipient accepted at once needs its sent marker only (one SET, as before);
while answers are kept the marker says "partial" instead of "1", so a job reads the answers
only when there are some (one GET for the rest, as before). A newsletter counts a message
sent once its last recipient is settled (accepted, or refused for good) and at least one
recipient accepted it; failed when it ends with none.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.message import Message
from typing import Any, Literal

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from asyncjobs.arqcompat import job_key_prefix, timestamp_ms
from asyncjobs.errors import JobError, PermanentJobError, TransientJobError
from asyncjobs.keys import (
    MAIL_BATCH_KEY_PREFIX,
    RECIPIENTS_KEY_PREFIX,
    SENT_KEY_PREFIX,
    WAITS_KEY_PREFIX,
    mail_batch_key,
)
from asyncjobs.luascript import LuaScript
from asyncjobs.redis import NotReplicatedError, execute_replicated
from asyncjobs.settings import Settings
from jobs.context import WorkerContext
from jobs.deadletter import DeadLetter, add_dead_letter
from jobs.mail.smtp import Reply, SendOutcome, refused_replies
from jobs.values import as_text, now_utc

log = logging.getLogger(__name__)

Status = Literal["accepted", "deferred", "refused"]
PARTIAL = "partial"  # the sent marker's value while recipients' answers are kept ("1": all sent)


@dataclass(frozen=True)
class Answer:
    """A recipient's last answer. A refusal names the job it binds (see the module's doc)."""

    status: Status
    code: int
    message: str
    job_id: str = ""

    @classmethod
    def of_refusal(cls, reply: Reply, job_id: str) -> Answer:
        code, message = reply
        return cls("deferred" if 400 <= code < 500 else "refused", code, message, job_id)

    @classmethod
    def loads(cls, raw: bytes | str) -> Answer:
        fields = json.loads(raw)
        return cls(fields["status"], fields["code"], fields["message"], fields.get("job", ""))

    def dumps(self) -> str:
        fields = {"status": self.status, "code": self.code, "message": self.message}
        return json.dumps(fields | {"job": self.job_id})

    def shown(self) -> dict[str, Any]:
        return {"status": self.status, "code": self.code, "message": self.message}


async def recorded_answers(redis: Redis, message_id: str) -> tuple[bool, dict[str, Answer]]:
    """Whether every recipient has the message (its sent marker), and else each recipient's
    last answer. The marker says PARTIAL while answers are kept, so a message nothing is known
    of (nearly all) costs one GET, as the sent marker's check always did."""
    marker = await redis.get(SENT_KEY_PREFIX + message_id)
    if marker is None or as_text(marker) != PARTIAL:
        return marker is not None, {}
    raw = await redis.hgetall(RECIPIENTS_KEY_PREFIX + message_id)  # type: ignore[misc]
    return False, {as_text(rcpt): Answer.loads(answer) for rcpt, answer in raw.items()}


def job_recipients(envelope: list[str], chosen: list[str] | None) -> list[str]:
    """Whom this job sends to: the message's recipients, or the part of them `chosen` names
    (a dead letter's retry of the refused ones). Nobody else: that would be a relay."""
    if chosen is None:
        return envelope
    known = {rcpt.lower(): rcpt for rcpt in envelope}
    strangers = [rcpt for rcpt in chosen if rcpt.lower() not in known]
    if strangers:
        raise PermanentJobError(f"recipients {strangers} are not recipients of the message")
    return list(dict.fromkeys(known[rcpt.lower()] for rcpt in chosen))


@dataclass
class Delivery:
    """One job's view of its message: the message's recipients, this job's part of them, and
    every recipient's last answer (this job's and earlier ones')."""

    message_id: str
    job_id: str
    envelope: list[str]
    recipients: list[str]
    answers: dict[str, Answer]

    def settled(self, rcpt: str) -> bool:
        answer = self.answers.get(rcpt)
        if answer is None or answer.status == "deferred":
            return False
        return answer.status == "accepted" or answer.job_id == self.job_id

    def to_send(self) -> list[str]:
        return [rcpt for rcpt in self.recipients if not self.settled(rcpt)]

    def having(self, status: Status) -> list[str]:
        return [r for r in self.recipients if (a := self.answers.get(r)) and a.status == status]

    def all_at_once(self, outcome: SendOutcome) -> bool:
        """Every recipient of the message took it in one go, and nothing was known before:
        the sent marker alone says it all (the common case, one SET)."""
        return not self.answers and not outcome.refused and self.recipients == self.envelope

    def answers_of(self, outcome: SendOutcome) -> dict[str, Answer]:
        accepted = Answer("accepted", 250, outcome.response)
        answers = {rcpt: accepted for rcpt in outcome.accepted}
        for rcpt, reply in outcome.replies.items():
            answers[rcpt] = Answer.of_refusal(reply, self.job_id)
        return answers

    def answers_of_refusals(self, replies: dict[str, Reply]) -> dict[str, Answer]:
        return {rcpt: Answer.of_refusal(reply, self.job_id) for rcpt, reply in replies.items()}

    async def record(
        self, redis: Redis, new: dict[str, Answer], batch_id: str | None, settings: Settings
    ) -> None:
        """Keep `new` answers; with them the sent marker once every recipient of the message
        has it, and the message's count in its batch once this job has nothing left to send.
        One round trip (and a WAIT with REDIS_WAIT_REPLICAS, as for the sent marker)."""
        self.answers.update(new)
        ttl, key = int(settings.sent_marker_ttl), RECIPIENTS_KEY_PREFIX + self.message_id
        waiting = settings.redis_wait_replicas > 0
        async with redis.pipeline(transaction=not waiting) as pipe:  # WAIT cannot go in a MULTI
            pipe.hset(key, mapping={rcpt: answer.dumps() for rcpt, answer in new.items()})
            pipe.expire(key, ttl)
            everyone = all(self.answers.get(r, _NONE).status == "accepted" for r in self.envelope)
            pipe.set(SENT_KEY_PREFIX + self.message_id, "1" if everyone else PARTIAL, ex=ttl)
            if batch_id and not self.to_send() and self.having("accepted"):
                await count_in_batch(redis, batch_id, [self.message_id], "sent", ttl, pipe)
            try:
                await execute_replicated(pipe, settings)
            except NotReplicatedError as exc:
                log.warning(
                    "email %s: recipients' answers not replicated: %s", self.message_id, exc
                )

    def settle(self) -> None:
        """Raise unless this job is done: TransientJobError while recipients wait for a retry
        (the deferred, and only they, are tried again), PermanentJobError when every one was
        refused for good."""
        if waiting := self.to_send():
            raise TransientJobError(
                f"{len(waiting)} of {len(self.recipients)} recipient(s) deferred, retrying "
                f"them: {self.detail(waiting)}{self._others(waiting)}"
            )
        if not self.having("accepted"):
            raise PermanentJobError(f"all recipients refused: {self.detail(self.recipients)}")

    def result(self, response: str) -> dict[str, Any]:
        """The job's result: each recipient's answer, and whether all of them have it
        (`sent`) or some were refused for good (`partial`)."""
        refused = self.having("refused")
        return {
            "message_id": self.message_id,
            "outcome": "partial" if refused else "sent",
            "recipients": {r: self.answers[r].shown() for r in self.recipients},
            "accepted": self.having("accepted"),
            "refused": {r: f"{self.answers[r].code} {self.answers[r].message}" for r in refused},
            "smtp_response": response,
        }

    def detail(self, recipients: list[str]) -> str:
        return "; ".join(
            f"{r}: {a.code} {a.message}" if (a := self.answers.get(r)) else f"{r}: not tried"
            for r in recipients
        )

    def _others(self, waiting: list[str]) -> str:
        accepted, refused = self.having("accepted"), self.having("refused")
        refused = [r for r in refused if r not in waiting]
        text = f"; accepted: {', '.join(accepted)}" if accepted else ""
        return text + (f"; refused for good: {self.detail(refused)}" if refused else "")


_NONE = Answer("deferred", 0, "")  # a recipient with no answer yet


async def send_part(
    ctx: WorkerContext,
    message: Message,
    delivery: Delivery,
    batch_id: str | None,
    record_sent: Callable[[], Awaitable[None]],
) -> SendOutcome | None:
    """Send the message to this job's recipients that have no final answer yet, and record
    their answers before the connection carries anything else (`record_sent`, the sent marker,
    when every recipient took it at once). None when every RCPT TO was refused: nothing was
    sent, and their answers are recorded (the 5xx ones are not tried again by this job)."""

    async def record(outcome: SendOutcome) -> None:
        answers = delivery.answers_of(outcome)
        if delivery.all_at_once(outcome):
            await record_sent()
            delivery.answers.update(answers)
        else:
            await delivery.record(ctx.redis, answers, batch_id, ctx.settings)

    try:
        return await ctx.smtp.send(message, delivery.to_send(), on_accepted=record)
    except JobError as exc:
        replies = refused_replies(exc)
        if not replies:
            raise
    await delivery.record(ctx.redis, delivery.answers_of_refusals(replies), batch_id, ctx.settings)
    return None


def refused_for_good(outcome: SendOutcome) -> list[str]:
    """The recipients of a sent message that its server refused with a 5xx."""
    return [rcpt for rcpt, (code, _) in outcome.replies.items() if not 400 <= code < 500]


BatchOutcome = Literal["sent", "failed", "aborted"]
BATCH_OUTCOMES: tuple[BatchOutcome, ...] = ("sent", "failed", "aborted")  # a callback's counts
_BATCH_RECORD = LuaScript("jobs.mail", "batch_record")


async def count_in_batch(
    redis: Redis,
    batch_id: str,
    message_ids: Sequence[str],
    outcome: BatchOutcome,
    ttl: int,
    pipe: Pipeline | None = None,
    *,
    sent_marker: bool = False,
    unknown_jobs: Sequence[str] | None = None,
) -> int:
    """The messages' count in their batch (a newsletter's progress), and in the same script
    call the release of its callback when this was the last outcome (batch_record.lua); on
    `pipe` (a pipeline of `redis`) if given. `sent_marker`: one message's sent marker too.
    `unknown_jobs` (each message's job id): only the messages that have no outcome and no
    job. The number newly counted (0 on a pipe)."""
    keys = [MAIL_BATCH_KEY_PREFIX + batch_id]
    keys += [mail_batch_key(batch_id, o) for o in BATCH_OUTCOMES]
    keys.append(SENT_KEY_PREFIX + message_ids[0] if sent_marker else keys[0])
    if unknown_jobs is not None:
        keys += [job_key_prefix + job_id for job_id in unknown_jobs]
    args: list[str | int] = [
        outcome,
        ttl,
        timestamp_ms(),
        WAITS_KEY_PREFIX,
        "1" if unknown_jobs is not None else "0",
        "1" if sent_marker else "0",
        *message_ids,
    ]
    added = await _BATCH_RECORD.run(redis, keys, args, pipe)
    return int(added) if pipe is None else 0


async def count_failed(redis: Redis, message_id: str, batch_id: str, ttl: int) -> None:
    """A message of a batch ended in the dead-letter store: failed, unless a recipient has it
    (its refused part, retried from its dead letter and refused again; its deferred part,
    out of time), which keeps it counted sent."""
    sent, answers = await recorded_answers(redis, message_id)
    reached = sent or any(answer.status == "accepted" for answer in answers.values())
    await count_in_batch(redis, batch_id, [message_id], "sent" if reached else "failed", ttl)


async def dead_letter_refused(
    ctx: WorkerContext, delivery: Delivery, arguments: dict[str, Any]
) -> None:
    """The recipients refused for good, of a message the others have: in the dead-letter store
    under the job's id, as a retry would send it (to them alone), while the job completes."""
    refused = delivery.having("refused")
    if not refused or not delivery.job_id:  # outside a worker there is no job to name
        return
    entry = DeadLetter(
        id=delivery.job_id,
        function="send_email",
        arguments=arguments | {"recipients": refused},
        error=(
            f"{len(refused)} of {len(delivery.recipients)} recipient(s) refused for good "
            f"(the others have the message): {delivery.detail(refused)}"
        ),
        reason="permanent",
        tries=ctx.job_try,
        enqueue_time=ctx.enqueue_time,
        failed_at=now_utc(),
    )
    await add_dead_letter(ctx.redis, entry, ctx.settings)


def job_id_of(ctx: WorkerContext) -> str:
    """The running job's id; "" for a call outside a worker (a test calling the job)."""
    try:
        return ctx.job_id
    except KeyError:
        return ""

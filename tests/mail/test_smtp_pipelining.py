"""SMTP PIPELINING (jobs/mail/pipelining.py) against real servers on loopback: aiosmtpd (the
`smtp` fixture, which says PIPELINING, as Postfix and Exim do) and, where the test needs a
server that behaves in one exact way, a small asyncio one written here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from email.mime.text import MIMEText

import pytest

from app.mailsink import server_port
from asyncjobs.errors import PermanentJobError, TransientJobError
from asyncjobs.settings import Settings
from jobs.mail.smtp import SmtpPool
from tests.servers import RecordingSmtpHandler


def message(text: str = "hello", to: str = "a@example.com") -> MIMEText:
    mime = MIMEText(text, "plain", "us-ascii")
    mime["From"] = "Sender <sender@example.com>"
    mime["To"] = to
    mime["Subject"] = "pipelined"
    mime["Message-ID"] = "<p1@example.com>"
    return mime


def pool_for(port: int) -> SmtpPool:
    return SmtpPool(Settings(smtp_host="127.0.0.1", smtp_port=port, smtp_timeout=5))


async def test_recipients_refused_in_the_group_are_reported_and_the_rest_get_it(
    smtp: tuple[RecordingSmtpHandler, int],
) -> None:
    handler, port = smtp
    handler.refuse_rcpt = {"gone@example.com"}
    pool = pool_for(port)
    try:
        body = "line one\n.starts with a dot\n..two dots\n.\nlast"
        outcome = await pool.send(
            message(body), ["a@example.com", "gone@example.com", "b@example.com"]
        )
        again = await pool.send(message("second"), ["a@example.com"])  # same connection
    finally:
        await pool.close()
    assert outcome.accepted == ["a@example.com", "b@example.com"]
    assert list(outcome.refused) == ["gone@example.com"]
    assert outcome.refused["gone@example.com"].startswith("550")
    assert again.accepted == ["a@example.com"]
    first, second = handler.messages
    assert first.mail_from == "sender@example.com"
    assert first.rcpt_tos == ["a@example.com", "b@example.com"]
    # dot-stuffing: lines that start with dots arrive as they were written
    assert first.message.get_content().replace("\r\n", "\n").rstrip("\n") == body
    assert second.message.get_content().strip() == "second"


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ("554 5.7.1 rejected as spam", PermanentJobError),
        ("452 4.3.1 out of room", TransientJobError),
    ],
)
async def test_a_refused_message_is_classified_by_its_reply(
    smtp: tuple[RecordingSmtpHandler, int], reply: str, error: type[Exception]
) -> None:
    handler, port = smtp
    handler.reject_with = reply
    pool = pool_for(port)
    try:
        with pytest.raises(error, match=reply[:3]):
            await pool.send(message(), ["a@example.com"])
        handler.reject_with = None
        await pool.send(message(), ["a@example.com"])  # a fresh connection after the failure
    finally:
        await pool.close()
    assert len(handler.messages) == 1


async def test_every_recipient_refused_is_permanent_and_sends_no_message(
    smtp: tuple[RecordingSmtpHandler, int],
) -> None:
    handler, port = smtp
    handler.refuse_rcpt = {"x@example.com", "y@example.com"}
    pool = pool_for(port)
    try:
        with pytest.raises(PermanentJobError, match="all recipients refused"):
            await pool.send(message(), ["x@example.com", "y@example.com"])
    finally:
        await pool.close()
    assert handler.messages == []


async def test_a_server_without_pipelining_gets_one_command_at_a_time(
    smtp: tuple[RecordingSmtpHandler, int],
) -> None:
    handler, port = smtp
    handler.pipelining = False
    pool = pool_for(port)
    try:
        outcome = await pool.send(message(), ["a@example.com", "b@example.com"])
    finally:
        await pool.close()
    assert outcome.accepted == ["a@example.com", "b@example.com"]
    assert [m.rcpt_tos for m in handler.messages] == [["a@example.com", "b@example.com"]]


class HoldingServer(asyncio.Protocol):
    """Says PIPELINING, then answers nothing of a transaction until it has its DATA command:
    a client that waits for MAIL's reply before sending RCPT never gets one. `behaviour`
    decides what happens once DATA is in: "accept" replies to all and takes the message,
    "hang up" closes the connection instead."""

    def __init__(self, behaviour: str, seen: list[bytes]) -> None:
        self.behaviour, self.seen = behaviour, seen
        self.buffer = b""
        self.held: list[bytes] = []
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 holding ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end == -1:
                    return
                self.seen.append(self.buffer[: end + 2])
                self.buffer, self.in_data = self.buffer[end + 5 :], False
                self.transport.write(b"250 2.0.0 queued\r\n")
                continue
            line, found, self.buffer = self.buffer.partition(b"\r\n")
            if not found:
                self.buffer = line
                return
            self.seen.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(b"250-holding\r\n250 PIPELINING\r\n")
            elif verb in (b"MAIL", b"RCPT"):
                self.held.append(b"250 OK\r\n")
            elif verb == b"DATA":
                if self.behaviour == "hang up":
                    self.transport.close()
                    return
                self.transport.write(b"".join(self.held) + b"354 go ahead\r\n")
                self.held, self.in_data = [], True
            elif verb == b"QUIT":
                self.transport.write(b"221 bye\r\n")
                self.transport.close()
                return
            else:
                self.transport.write(b"250 OK\r\n")


HoldingStarter = Callable[[str], Awaitable[tuple[int, list[bytes]]]]


@pytest.fixture
async def holding_server() -> AsyncIterator[HoldingStarter]:
    """Starts a HoldingServer: (its port, what it received)."""
    servers: list[asyncio.Server] = []
    loop = asyncio.get_running_loop()

    async def start(behaviour: str) -> tuple[int, list[bytes]]:
        seen: list[bytes] = []
        server = await loop.create_server(lambda: HoldingServer(behaviour, seen), "127.0.0.1", 0)
        servers.append(server)
        return server_port(server), seen

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_the_envelope_goes_without_waiting_for_replies(
    holding_server: HoldingStarter,
) -> None:
    port, seen = await holding_server("accept")
    pool = pool_for(port)
    try:
        outcome = await asyncio.wait_for(
            pool.send(message(), ["a@example.com", "b@example.com"]), 10
        )
    finally:
        await pool.close()
    assert outcome.accepted == ["a@example.com", "b@example.com"]
    commands = [line for line in seen if not line.startswith(b"From")][1:5]
    assert commands[0].startswith(b"MAIL FROM:<sender@example.com>")
    assert commands[1:] == [b"RCPT TO:<a@example.com>", b"RCPT TO:<b@example.com>", b"DATA"]


async def test_a_server_hanging_up_mid_transaction_is_a_transient_error(
    holding_server: HoldingStarter,
) -> None:
    port, _ = await holding_server("hang up")
    pool = pool_for(port)
    try:
        with pytest.raises(TransientJobError):
            await asyncio.wait_for(pool.send(message(), ["a@example.com"]), 10)
    finally:
        await pool.close()

"""SMTP over STARTTLS with a certificate from a private CA made here (trustme): trusted through
SMTP_TLS_CA_FILE, refused without it, accepted unchecked only with SMTP_TLS_VERIFY=false (and
a warning)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trustme

from app.mailsink import server_port, start_smtp_server
from asyncjobs.errors import TransientJobError
from asyncjobs.settings import Settings
from jobs.mail.email import EmailSpec, build_message
from jobs.mail.smtp import SmtpPool
from tests.servers import RecordingSmtpHandler

SPEC = EmailSpec.model_validate({"to": "a@example.com", "subject": "s", "text": "t"})


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_smtp(ca: trustme.CA) -> AsyncIterator[tuple[RecordingSmtpHandler, int]]:
    """An SMTP server that requires STARTTLS, its certificate signed by the test CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    handler = RecordingSmtpHandler()
    server = await start_smtp_server(handler, tls=context)
    try:
        yield handler, server_port(server)
    finally:
        server.close()
        await server.wait_closed()


async def send_one(settings: Settings) -> None:
    pool = SmtpPool(settings)
    try:
        await pool.send(build_message(SPEC, settings.mail_from, "<tls@test>"), ["a@example.com"])
    finally:
        await pool.close()


async def test_a_private_ca_is_trusted_through_smtp_tls_ca_file(
    ca: trustme.CA,
    tls_smtp: tuple[RecordingSmtpHandler, int],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    handler, port = tls_smtp
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    await send_one(make_settings(smtp_port=port, smtp_tls_ca_file=ca_file))
    assert handler.message_ids() == ["<tls@test>"]  # the server refuses MAIL before STARTTLS


async def test_an_unknown_ca_is_refused_by_default(
    tls_smtp: tuple[RecordingSmtpHandler, int], make_settings: Callable[..., Settings]
) -> None:
    handler, port = tls_smtp
    with pytest.raises(TransientJobError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
        await send_one(make_settings(smtp_port=port))
    assert handler.messages == []


async def test_verification_off_must_be_explicit_and_is_logged(
    tls_smtp: tuple[RecordingSmtpHandler, int],
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler, port = tls_smtp
    with caplog.at_level(logging.WARNING, logger="jobs.mail.smtp"):
        await send_one(make_settings(smtp_port=port, smtp_tls_verify=False))
    assert handler.message_ids() == ["<tls@test>"]
    assert any("SMTP_TLS_VERIFY=false" in m for m in caplog.messages), caplog.messages
    assert Settings(_env_file=None).smtp_tls_verify is True

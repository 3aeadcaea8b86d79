"""The dev mail sink stores what a real SMTP client sends, and the API lists it."""

from __future__ import annotations

from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

from app.mailsink import MaildirHandler, list_messages, read_message, server_port, start_smtp_server
from app.web import create_app
from asyncjobs.settings import Settings
from tests.helpers import api_client


async def test_sink_stores_messages_as_eml_files(tmp_path: Path) -> None:
    server = await start_smtp_server(MaildirHandler(tmp_path))
    try:
        for n in range(3):
            message = EmailMessage()
            message["From"] = "from@example.com"
            message["To"] = "to@example.com"
            message["Subject"] = f"Message {n}"
            message.set_content("body")
            await aiosmtplib.send(
                message, hostname="127.0.0.1", port=server_port(server), timeout=5,
                recipients=["to@example.com", "bcc@example.com"],
            )  # fmt: skip
    finally:
        server.close()
        await server.wait_closed()
    listed = await list_messages(tmp_path)
    assert [m.subject for m in listed] == ["Message 2", "Message 1", "Message 0"]  # newest first
    assert listed[0].rcpt_to == ["to@example.com", "bcc@example.com"]
    assert listed[0].mail_from == "from@example.com"
    raw = await read_message(tmp_path, listed[0].name)
    assert raw is not None and b"Subject: Message 2" in raw
    assert await read_message(tmp_path, "../../etc/passwd") is None
    assert not list(tmp_path.glob("*.tmp"))


async def test_mail_endpoints_only_exist_in_dev_mode(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    async with api_client(create_app(make_settings())) as client:
        assert (await client.get("/dev/mail")).status == 404
    settings = make_settings(mail_sink_dir=tmp_path)
    async with api_client(create_app(settings)) as client:
        response = await client.get("/dev/mail")
        assert response.status == 200
        assert await response.json() == {"messages": []}
        assert (await client.get("/dev/mail?limit=0")).status == 400
        assert (await client.get("/dev/mail/1234567890123456789-deadbeef.eml")).status == 404

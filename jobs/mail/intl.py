"""Internationalized addresses (RFC 6531) to a server with or without SMTPUTF8.

A message with a non-ASCII address is built by the modern email package (see
jobs.mail.email.build_message). A server that offers SMTPUTF8 gets it as it is. One that does
not gets it downgraded: every domain as IDNA A-labels (`bücher.example` ->
`xn--bcher-kva.example`), the same mailbox to DNS and to the receiving server. A local part that
is not ASCII has no such form: that recipient is refused for good (553 5.6.7, as RFC 6531
servers answer), the others get the message; a sender whose local part is not ASCII fails it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from email.headerregistry import Address, Group
from email.message import EmailMessage

import aiosmtplib

from asyncjobs.addresses import ascii_domain
from asyncjobs.errors import PermanentJobError

ADDRESS_HEADERS = ("From", "Sender", "Reply-To", "To", "Cc")
NEEDS_SMTPUTF8 = (
    553,
    "5.6.7 not sent: the address's local part is not ASCII and the SMTP server does not "
    "offer SMTPUTF8 (RFC 6531)",
)
_MESSAGE_ID_DOMAIN = re.compile(r"@([^@>]+)>$")

Refused = dict[str, aiosmtplib.SMTPResponse]


async def send_international(
    client: aiosmtplib.SMTP, message: EmailMessage, recipients: Sequence[str]
) -> tuple[Refused, str]:
    """`client.send_message`, for a message with non-ASCII addresses: as it is with SMTPUTF8,
    else downgraded (see the module). Refused recipients are keyed as `recipients` names them.
    Every recipient refused: SMTPRecipientsRefused, as the server's refusals are."""
    if client.supports_extension("smtputf8"):
        return await client.send_message(message, recipients=list(recipients))
    sender = ascii_address(str(message["From"].addresses[0].addr_spec))
    if sender is None:
        raise PermanentJobError(
            f"the sender {message['From']} has a local part that is not ASCII, and the SMTP "
            "server does not offer SMTPUTF8 (RFC 6531): the message cannot be sent"
        )
    envelope = {rcpt: ascii_address(rcpt) for rcpt in recipients}
    unsendable = {rcpt: aiosmtplib.SMTPResponse(*NEEDS_SMTPUTF8) for rcpt, a in envelope.items()
                  if a is None}  # fmt: skip
    sendable = {a: rcpt for rcpt, a in envelope.items() if a is not None}
    if not sendable:
        raise aiosmtplib.SMTPRecipientsRefused(
            [aiosmtplib.SMTPRecipientRefused(*NEEDS_SMTPUTF8, rcpt) for rcpt in unsendable]
        )
    errors, response = await client.send_message(
        downgraded(message), sender=sender, recipients=list(sendable)
    )
    return {sendable[a]: reply for a, reply in errors.items()} | unsendable, response


def ascii_address(address: str) -> str | None:
    """The address with its domain in A-labels; None when its local part is not ASCII."""
    local, _, domain = address.rpartition("@")
    if not local.isascii():
        return None
    try:
        return f"{local}@{ascii_domain(domain)}"
    except ValueError:
        return None


def downgraded(message: EmailMessage) -> EmailMessage:
    """A copy whose address headers and Message-ID are ASCII but for display names (which the
    SMTP policy writes as RFC 2047 encoded words). An address whose local part is not ASCII
    becomes an empty group named after it (RFC 6857, 3.1.8): shown, not addressable."""
    copied = copy.deepcopy(message)
    for name in ADDRESS_HEADERS:
        header = message[name]
        if header is None:
            continue
        del copied[name]
        copied[name] = [_ascii_mailbox(address) for address in header.addresses]
    message_id = str(message["Message-ID"] or "")
    if not message_id.isascii():
        del copied["Message-ID"]
        copied["Message-ID"] = _MESSAGE_ID_DOMAIN.sub(lambda m: f"@{_ascii_or(m[1])}>", message_id)
    return copied


def _ascii_mailbox(address: Address) -> Address | Group:
    converted = ascii_address(address.addr_spec)
    if converted is None:
        return Group(display_name=address.addr_spec)
    local, _, domain = converted.rpartition("@")
    return Address(display_name=address.display_name, username=local, domain=domain)


def _ascii_or(domain: str) -> str:
    try:
        return ascii_domain(domain)
    except ValueError:
        return "localhost"

"""Email addresses as a deployment uses them: syntax checked by email-validator, dotless domains
(`localhost`, `mailhost`) accepted when the settings allow them, duplicates removed.

Validation context (pydantic's `context=`) carries `allow_local_domains`; without it, only
globally deliverable domains pass, as pydantic's own EmailStr allows.
"""

from __future__ import annotations

import re
from email.utils import make_msgid
from typing import Annotated

from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, ValidationInfo, WithJsonSchema

# One DNS label: what a dotless domain such as `localhost` or `mailhost` must be.
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$", re.IGNORECASE)
# A stand-in domain that email-validator accepts, to check the local part of a dotless address.
_ANY_DOMAIN = "example.com"


def check_address(value: str, allow_local_domains: bool = False) -> str:
    """The address, normalized (the domain lower-cased); ValueError saying what is wrong."""
    local, at, domain = value.rpartition("@")
    if at and allow_local_domains and _LABEL.match(domain):
        checked = _validate(f"{local}@{_ANY_DOMAIN}")
        return f"{checked.rpartition('@')[0]}@{domain.lower()}"
    try:
        return _validate(value)
    except ValueError as exc:
        if at and _LABEL.match(domain):
            raise ValueError(f"{exc} (MAIL_ALLOW_LOCAL_DOMAINS=true accepts it)") from None
        raise


def _validate(value: str) -> str:
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"value is not a valid email address: {exc}") from None


def _address(value: str, info: ValidationInfo) -> str:
    return check_address(value, bool((info.context or {}).get("allow_local_domains")))


Address = Annotated[
    str, AfterValidator(_address), WithJsonSchema({"type": "string", "format": "email"})
]


def unique_addresses(addresses: list[str], seen: set[str] | None = None) -> list[str]:
    """`addresses` without repeats, first occurrence kept. Domains are compared without case
    (they are case-insensitive); local parts as written (RFC 5321 lets a server tell them
    apart). `seen` carries what was already taken (across to, cc and bcc)."""
    seen = set() if seen is None else seen
    unique = []
    for address in addresses:
        local, _, domain = address.rpartition("@")
        key = f"{local}@{domain.lower()}"
        if key not in seen:
            seen.add(key)
            unique.append(address)
    return unique


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def new_message_id(sender: str, unique: str | None = None) -> str:
    """A globally unique Message-ID, fixed at enqueue time so every retry sends the same one:
    from `unique` (an id no other message has, e.g. derived from an Idempotency-Key, so that
    every try of the request names one message), or made up."""
    domain = domain_of(sender) or "localhost"
    return f"<{unique}@{domain}>" if unique else make_msgid(domain=domain)

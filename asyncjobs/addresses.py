"""Email addresses as a deployment uses them: syntax checked by email-validator, dotless domains
(`localhost`, `mailhost`) accepted when the settings allow them, duplicates removed.

Validation context (pydantic's `context=`) carries `allow_local_domains`; without it, only
globally deliverable domains pass, as pydantic's own EmailStr allows.

A `Mailbox` is an address that may carry a display name (`Ada Lovelace <ada@example.com>` or
`{"name": ..., "email": ...}`): the string itself is the bare address, so the envelope,
de-duplication, quotas and the sender-domain check see what they saw before; the headers
show the name.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from email.utils import make_msgid
from typing import Annotated, Any, TypeVar

from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, GetCoreSchemaHandler, ValidationInfo, WithJsonSchema
from pydantic_core import core_schema

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


MAX_NAME_CHARS = 256  # every name, quoted or encoded, then fits a header line (RFC 5322: 998)
# Control characters and line breaks: a CR or LF in a name would start a new header line.
_CONTROL = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")
# `Name <address>`, the name optionally in double quotes; the address is the last <...>.
_NAMED = re.compile(r"[ \t]*(?P<name>.*?)[ \t]*<(?P<address>[^<>]*)>[ \t]*", re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_MAILBOX_KEYS = frozenset({"name", "email"})


def check_display_name(name: str) -> str | None:
    """The display name, without surrounding blanks (None when nothing is left); ValueError
    for a line break or control character (header injection) or a name too long."""
    if _CONTROL.search(name):
        raise ValueError("a display name must be a single line (no CR, LF or control characters)")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"a display name is at most {MAX_NAME_CHARS} characters")
    return name.strip() or None


def split_mailbox(text: str) -> tuple[str | None, str]:
    """`Ada Lovelace <ada@example.com>` (or `"Lovelace, Ada" <...>`) as (name, address); any
    other text as (None, text). Nothing is checked: see `Mailbox`."""
    match = _NAMED.fullmatch(text)
    if match is None:
        return None, text
    name = match["name"]
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = _QUOTED_PAIR.sub(r"\1", name[1:-1])
    return name or None, match["address"]


class Mailbox(str):
    """An address (the string itself, as `check_address` normalizes it) and the display name
    the headers show (`name`, None when there is none). Compared and hashed as the address.

    In a pydantic model it takes `ada@example.com`, `Ada Lovelace <ada@example.com>` or
    `{"name": "Ada Lovelace", "email": "ada@example.com"}`, and is written back as the plain
    string when it has no name (as an `Address` is), else as `{name, email}`."""

    name: str | None

    def __new__(cls, address: str, name: str | None = None) -> Mailbox:
        mailbox = super().__new__(cls, address)
        mailbox.name = name or None
        return mailbox

    def __reduce__(self) -> tuple[Any, ...]:  # the CPU pool's processes get it pickled
        return (type(self), (str(self), self.name))

    def __repr__(self) -> str:
        return f"Mailbox({str(self)!r}, name={self.name!r})"

    def as_json(self) -> str | dict[str, str]:
        return str(self) if self.name is None else {"name": self.name, "email": str(self)}

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.with_info_plain_validator_function(
            _mailbox,
            serialization=core_schema.plain_serializer_function_ser_schema(cls.as_json),
            json_schema_input_schema=core_schema.union_schema(
                [
                    core_schema.str_schema(),
                    core_schema.typed_dict_schema(
                        {
                            "email": core_schema.typed_dict_field(core_schema.str_schema()),
                            "name": core_schema.typed_dict_field(
                                core_schema.nullable_schema(
                                    core_schema.str_schema(max_length=MAX_NAME_CHARS)
                                ),
                                required=False,
                            ),
                        },
                        extra_behavior="forbid",
                    ),
                ]
            ),
        )


def parse_mailbox(value: object, allow_local_domains: bool = False) -> Mailbox:
    """A Mailbox from any of its forms (see `Mailbox`); ValueError saying what is wrong."""
    if isinstance(value, Mailbox):
        name, address = value.name, str(value)
    elif isinstance(value, str):  # a line break in it ends up in the name or the address
        name, address = split_mailbox(value)
    elif isinstance(value, Mapping):
        name, address = _mailbox_fields(value)
    else:
        raise ValueError(
            "an address is 'ada@example.com', 'Ada Lovelace <ada@example.com>' "
            "or {'name': ..., 'email': ...}"
        )
    checked_name = check_display_name(name) if name is not None else None
    return Mailbox(check_address(address, allow_local_domains), checked_name)


def _mailbox_fields(value: Mapping[Any, Any]) -> tuple[str | None, str]:
    unknown = set(value) - _MAILBOX_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(map(str, unknown))}: use 'name' and 'email'")
    address, name = value.get("email"), value.get("name")
    if not isinstance(address, str):
        raise ValueError("'email' must be an address (a string)")
    if name is not None and not isinstance(name, str):
        raise ValueError("'name' must be a string")
    return name, address


def _mailbox(value: object, info: ValidationInfo) -> Mailbox:
    return parse_mailbox(value, bool((info.context or {}).get("allow_local_domains")))


def address_of(value: object) -> str:
    """The bare address of a mailbox in any form, unchecked ("" when there is none): for
    callers that see a job's arguments before its model does."""
    if isinstance(value, str):
        return split_mailbox(value)[1].strip()
    if isinstance(value, Mapping) and isinstance(value.get("email"), str):
        return str(value["email"])
    return ""


S = TypeVar("S", bound=str)


def unique_addresses(addresses: Sequence[S], seen: set[str] | None = None) -> list[S]:
    """`addresses` without repeats, first occurrence kept. Domains are compared without case
    (they are case-insensitive); local parts as written (RFC 5321 lets a server tell them
    apart). `seen` carries what was already taken (across to, cc and bcc). A Mailbox is
    compared by its address, whatever its name."""
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


@functools.lru_cache(maxsize=1024)
def ascii_domain(domain: str) -> str:
    """The domain as DNS and an SMTP server without SMTPUTF8 know it: internationalized
    labels as IDNA A-labels (`bücher.example` -> `xn--bcher-kva.example`); ValueError if it
    has no such form."""
    if domain.isascii():
        return domain
    try:
        return validate_email(f"x@{domain}", check_deliverability=False).ascii_domain
    except EmailNotValidError as exc:
        raise ValueError(f"domain {domain!r} has no ASCII (IDNA) form: {exc}") from None


def new_message_id(sender: str | Mapping[str, Any], unique: str | None = None) -> str:
    """A globally unique Message-ID, fixed at enqueue time so every retry sends the same one:
    from `unique` (an id no other message has, e.g. derived from an Idempotency-Key, so that
    every try of the request names one message), or made up. `sender` in any mailbox form;
    its domain in ASCII, so the id needs no SMTPUTF8."""
    domain = message_id_domain(address_of(sender))
    return f"<{unique}@{domain}>" if unique else make_msgid(domain=domain)


def message_id_domain(sender: str) -> str:
    """The right side of a Message-ID from the sender's address: its domain, in ASCII."""
    try:
        return ascii_domain(domain_of(sender)) or "localhost"
    except ValueError:
        return "localhost"

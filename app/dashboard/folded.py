"""JSON as a tree of nodes the job page folds (<details> per nested object or array), with long
arrays paged: a 1,000-recipient newsletter's arguments are 25 rows, not a 97,000-pixel <pre>.

Each long array pages on its own query parameter, `page.<path>`, so a link changes one list's
page and keeps the others'."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

PAGE_SIZE = 25
OPEN_UP_TO = 10  # a first-level object or array this small starts unfolded
PREVIEW_CHARS = 80
LONG_TEXT_CHARS = 160  # a string longer than this, or of several lines, is folded too
PAGE_PARAM = "page."

Href = Callable[[str, int], str]  # (path, page number) -> the link to that page of that list


@dataclass(frozen=True)
class Page:
    number: int
    pages: int
    first: int  # 1-based, for "26-50 of 1,000"
    last: int
    total: int
    previous: str | None
    next: str | None


@dataclass(frozen=True)
class Node:
    kind: str  # object, array, text (a long string), string, number, boolean, null
    text: str  # a scalar as JSON; a container's or long text's one-line preview
    path: str  # dotted, from the root: its anchor and its page parameter
    children: tuple[tuple[str, Node], ...] = ()
    open: bool = False
    page: Page | None = None
    full: str = ""  # a long string's whole text, shown once unfolded

    @property
    def anchor(self) -> str:
        return "f-" + self.path


def json_safe(value: Any) -> Any:
    """As a JSON reader would see it: datetimes and other objects as their text."""
    return json.loads(json.dumps(value, default=str))


def page_numbers(query: Mapping[str, str]) -> dict[str, int]:
    """The `page.<path>` parameters of a request; anything unreadable is the first page."""
    pages = {}
    for name, value in query.items():
        if name.startswith(PAGE_PARAM) and value.isdigit():
            pages[name.removeprefix(PAGE_PARAM)] = int(value)
    return pages


def fold(value: Any, path: str, pages: Mapping[str, int], href: Href, depth: int = 0) -> Node:
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
        return _container("object", value, items, path, pages, href, depth)
    if isinstance(value, list):
        indexed = [(str(i), v) for i, v in enumerate(value)]
        return _container("array", value, indexed, path, pages, href, depth)
    if isinstance(value, str) and (len(value) > LONG_TEXT_CHARS or "\n" in value):
        return Node("text", _preview(value.splitlines()[0] if value else ""), path, full=value)
    return Node(_scalar_kind(value), json.dumps(value, ensure_ascii=False), path)


def _container(
    kind: str,
    value: Any,
    items: list[tuple[str, Any]],
    path: str,
    pages: Mapping[str, int],
    href: Href,
    depth: int,
) -> Node:
    page = None
    if kind == "array" and len(items) > PAGE_SIZE:
        page, items = _paged(items, path, pages.get(path, 1), href)
    children = tuple(
        (key, fold(item, f"{path}.{key}", pages, href, depth + 1)) for key, item in items
    )
    small = len(value) <= OPEN_UP_TO
    opened = depth == 0 or (depth == 1 and small) or path in pages
    return Node(kind, _summary(kind, value), path, children, opened, page)


def _paged(
    items: list[tuple[str, Any]], path: str, number: int, href: Href
) -> tuple[Page, list[tuple[str, Any]]]:
    total = len(items)
    pages = -(-total // PAGE_SIZE)
    number = min(max(number, 1), pages)
    start = (number - 1) * PAGE_SIZE
    shown = items[start : start + PAGE_SIZE]
    page = Page(
        number=number,
        pages=pages,
        first=start + 1,
        last=start + len(shown),
        total=total,
        previous=href(path, number - 1) if number > 1 else None,
        next=href(path, number + 1) if number < pages else None,
    )
    return page, shown


def _summary(kind: str, value: Any) -> str:
    if kind == "array":
        return f"[{len(value):,} item{'' if len(value) == 1 else 's'}]"
    return _preview(json.dumps(value, ensure_ascii=False, separators=(", ", ": ")))


def _preview(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def _scalar_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string"

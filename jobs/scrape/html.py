"""Turn an HTML document into the summary a scrape job returns (selectolax: fast, C-backed)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from selectolax.lexbor import LexborHTMLParser as HTMLParser
from selectolax.lexbor import LexborNode
from yarl import URL

if TYPE_CHECKING:  # jobs.scrape.selectors checks CSS with is_valid_selector, below
    from jobs.scrape.selectors import SelectorSpec

NON_CONTENT_TAGS = ["script", "style", "noscript", "template"]
MAX_MATCHES_PER_SELECTOR = 100
MAX_LINKS = 1000
MAX_VALUE_CHARS = 10_000  # one match's text or attribute
MAX_EXTRACTED_CHARS = 256 * 1024  # all of a page's matches: past it, the selectors fail
URL_ATTRIBUTES = frozenset({"href", "src", "action", "poster", "cite", "data"})
MAX_OG_PROPERTIES = 50
MAX_META_CHARS = 2000  # one og: value or canonical URL
MAX_JSON_LD_CHARS = 64 * 1024  # a page's JSON-LD blocks, as written: later ones are skipped

Extracted = list[str] | str | None  # all matches, or the first one (None: no match)


@dataclass
class PageSummary:
    title: str | None
    description: str | None
    links_count: int
    text: str
    links: list[str] = field(default_factory=list)  # absolute http(s) URLs, in page order
    # as written (stored: shorter), and what they are relative to (a <base href>, or the URL)
    hrefs: list[str] = field(default_factory=list)
    base: str = ""
    extracted: dict[str, Extracted] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Extraction:
    """What a caller's selectors matched; `over_limit` when the matches passed
    MAX_EXTRACTED_CHARS (what was extracted until then is in `values`)."""

    values: dict[str, Extracted]
    over_limit: bool = False


def summarize_html(html: str, url: str = "") -> PageSummary:
    """The page's title, description, links, metadata and text: work that grows with the
    page's size alone (capped by SCRAPE_MAX_BYTES), unlike a caller's selectors (see select).
    Links and URLs in the metadata are made absolute against `url` (and a `<base href>`)."""
    tree = HTMLParser(html)
    title_node = tree.css_first("title")
    description_node = tree.css_first('meta[name="description" i]')
    hrefs = [node.attributes.get("href") or "" for node in tree.css("a[href]")]
    lowered = html.lower()  # for the substring checks below: far cheaper than CSS queries
    base = page_base(tree, url) if "<base" in lowered else URL(url)
    # before the scripts (JSON-LD) go; most pages have none, and a substring search is far
    # cheaper than the three CSS queries (measured on the bench page: 8 us of 110)
    has_metadata = any(marker in lowered for marker in METADATA_MARKERS)
    metadata = page_metadata(tree, base) if has_metadata else no_metadata()
    tree.strip_tags(NON_CONTENT_TAGS)
    root = tree.body or tree.root
    text = " ".join(root.text(separator=" ", strip=True).split()) if root else ""
    return PageSummary(
        title=title_node.text(strip=True) if title_node else None,
        description=(description_node.attributes.get("content") or None)
        if description_node
        else None,
        links_count=len(hrefs),
        text=text,
        links=absolute_links(base, hrefs, MAX_LINKS),
        hrefs=[h for h in hrefs if h][:MAX_LINKS],
        base=str(base),
        metadata=metadata,
    )


def page_base(tree: HTMLParser, url: str) -> URL:
    """What the page's relative URLs are relative to: its `<base href>`, else its URL."""
    page = URL(url)
    node = tree.css_first("base[href]")
    base = _join(page, node.attributes.get("href")) if node is not None else None
    return base if base is not None else page


def absolute_links(base: URL, hrefs: Iterable[str], limit: int) -> list[str]:
    """http(s) URLs of the links, without fragments, each once, in page order; at most
    `limit` (a relative href against no base stays out: it names nothing)."""
    links: dict[str, None] = {}
    for href in hrefs:
        target = _join(base, href)
        if target is None or target.scheme not in ("http", "https") or not target.host:
            continue
        links.setdefault(str(target.with_fragment(None)))
        if len(links) >= limit:
            break
    return list(links)


def _join(base: URL, href: str | None) -> URL | None:
    if not href or not href.strip():
        return None
    try:
        return base.join(URL(href.strip()))
    except (ValueError, TypeError):
        return None


def page_metadata(tree: HTMLParser, base: URL) -> dict[str, Any]:
    """The page's canonical URL, OpenGraph properties (`og:title` as `title`, the first of
    each) and JSON-LD blocks (parsed; `json_ld_skipped` counts those not valid JSON or past
    MAX_JSON_LD_CHARS)."""
    canonical_node = tree.css_first('link[rel~="canonical" i][href]')
    canonical = _join(base, canonical_node.attributes.get("href")) if canonical_node else None
    og: dict[str, str] = {}
    for node in tree.css('meta[property^="og:" i][content]'):
        name = (node.attributes.get("property") or "")[3:].strip().lower()
        if name and name not in og and len(og) < MAX_OG_PROPERTIES:
            og[name] = (node.attributes.get("content") or "")[:MAX_META_CHARS]
    json_ld, skipped = _json_ld(tree.css('script[type="application/ld+json" i]'))
    return {
        "canonical": str(canonical)[:MAX_META_CHARS] if canonical is not None else None,
        "og": og,
        "json_ld": json_ld,
        "json_ld_skipped": skipped,
    }


# What a page must contain (lower-cased) for it to have metadata (a superset)
METADATA_MARKERS = ("canonical", "og:", "ld+json")


def no_metadata() -> dict[str, Any]:
    return {"canonical": None, "og": {}, "json_ld": [], "json_ld_skipped": 0}


def _json_ld(nodes: list[LexborNode]) -> tuple[list[Any], int]:
    blocks: list[Any] = []
    skipped = 0
    budget = MAX_JSON_LD_CHARS
    for node in nodes:
        raw = node.text(deep=True).strip()
        if not raw or len(raw) > budget:
            skipped += 1
            continue
        try:
            blocks.append(json.loads(raw))
        except ValueError:  # sites ship broken JSON-LD (a trailing comma): counted, not fatal
            skipped += 1
            continue
        budget -= len(raw)
    return blocks, skipped


def select(html: str, selectors: dict[str, SelectorSpec], url: str = "") -> Extraction:
    """What each of a caller's selectors matches: the text, or an attribute (`href` and other
    URL attributes made absolute), of the first match or of every match (at most
    MAX_MATCHES_PER_SELECTOR). Its cost depends on the selector and the page's nesting (`span
    div div div div div` on 100 nested divs: seconds), so it runs in a pool process under a
    deadline (jobs.cpulimit)."""
    tree = HTMLParser(html)
    base = page_base(tree, url)
    values: dict[str, Extracted] = {}
    budget = MAX_EXTRACTED_CHARS
    for name, spec in selectors.items():
        nodes = tree.css(spec.css)[:MAX_MATCHES_PER_SELECTOR] if spec.all else _first(tree, spec)
        found = [_value(node, spec.attr, base) for node in nodes]
        budget -= sum(len(value) for value in found if value is not None)
        if budget < 0:
            return Extraction(values, over_limit=True)
        values[name] = [v for v in found if v is not None] if spec.all else _only(found)
    return Extraction(values)


def _first(tree: HTMLParser, spec: SelectorSpec) -> list[LexborNode]:
    node = tree.css_first(spec.css)
    return [node] if node is not None else []


def _only(found: list[str | None]) -> str | None:
    return found[0] if found else None


def _value(node: LexborNode, attr: str | None, base: URL) -> str | None:
    """The node's text, or its attribute (None when it has none; "" for one with no value)."""
    if attr is None:
        return node.text(separator=" ", strip=True)[:MAX_VALUE_CHARS]
    attributes = node.attributes
    name = attr.lower()  # the parser lowercases attribute names, as HTML does
    if name not in attributes:
        return None
    value = (attributes[name] or "").strip()
    if name in URL_ATTRIBUTES and (target := _join(base, value)) is not None:
        value = str(target)
    return value[:MAX_VALUE_CHARS]


def is_valid_selector(css: str) -> bool:
    try:
        HTMLParser("<p></p>").css(css)
    except Exception:  # selectolax raises plain exceptions for syntax errors
        return False
    return True

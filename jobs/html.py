"""Turn an HTML document into the summary a scrape job returns (selectolax: fast, C-backed)."""

from __future__ import annotations

from dataclasses import dataclass, field

from selectolax.lexbor import LexborHTMLParser as HTMLParser

NON_CONTENT_TAGS = ["script", "style", "noscript", "template"]
MAX_MATCHES_PER_SELECTOR = 100
MAX_LINKS = 1000


@dataclass
class PageSummary:
    title: str | None
    description: str | None
    links_count: int
    text: str
    links: list[str] = field(default_factory=list)  # raw href values, in page order
    extracted: dict[str, list[str]] = field(default_factory=dict)


def summarize_html(html: str, selectors: dict[str, str] | None = None) -> PageSummary:
    tree = HTMLParser(html)
    title_node = tree.css_first("title")
    description_node = tree.css_first('meta[name="description" i]')
    extracted = {
        name: [node.text(separator=" ", strip=True) for node in tree.css(css)][
            :MAX_MATCHES_PER_SELECTOR
        ]
        for name, css in (selectors or {}).items()
    }
    hrefs = [node.attributes.get("href") or "" for node in tree.css("a[href]")]
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
        links=[h for h in hrefs if h][:MAX_LINKS],
        extracted=extracted,
    )


def is_valid_selector(css: str) -> bool:
    try:
        HTMLParser("<p></p>").css(css)
    except Exception:  # selectolax raises plain exceptions for syntax errors
        return False
    return True

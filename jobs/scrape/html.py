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


def summarize_html(html: str) -> PageSummary:
    """The page's title, description, links and text: work that grows with the page's size
    alone (capped by SCRAPE_MAX_BYTES), unlike a caller's selectors (see select)."""
    tree = HTMLParser(html)
    title_node = tree.css_first("title")
    description_node = tree.css_first('meta[name="description" i]')
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
    )


def select(html: str, selectors: dict[str, str]) -> dict[str, list[str]]:
    """The text of what each of a caller's selectors matches. Its cost depends on the selector
    and the page's nesting (`span div div div div div` on 100 nested divs: seconds), so it runs
    in a pool process under a deadline (jobs.cpulimit)."""
    tree = HTMLParser(html)
    return {
        name: [node.text(separator=" ", strip=True) for node in tree.css(css)][
            :MAX_MATCHES_PER_SELECTOR
        ]
        for name, css in selectors.items()
    }


def is_valid_selector(css: str) -> bool:
    try:
        HTMLParser("<p></p>").css(css)
    except Exception:  # selectolax raises plain exceptions for syntax errors
        return False
    return True

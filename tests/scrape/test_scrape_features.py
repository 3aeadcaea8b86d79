"""Scraping, against a real loopback site, the real API and a real worker: selectors applied
whatever the server answers (304s, forced fetches), attributes and lists, a page's links and
metadata, windows-1252 for short undeclared Latin pages, and typed failure reasons counted
once per scrape that fails for good."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest
from arq.connections import ArqRedis
from arq.worker import Worker
from selectolax.lexbor import LexborHTMLParser

from asyncjobs.keys import SCRAPE_FAILURES_KEY
from jobs.scrape.documents import document_id
from jobs.scrape.encoding import sniff_encoding
from jobs.scrape.html import MAX_EXTRACTED_CHARS
from jobs.scrape.page import scrape_page
from tests.conftest import Ctx
from tests.helpers import ApiClient
from tests.jobwait import wait_job
from tests.servers import SiteStats


async def scrape(api: ApiClient, **body: Any) -> dict[str, Any]:
    """POST /jobs/scrape and wait: the finished job's status body."""
    response = await api.post("/jobs/scrape", json=body)
    assert response.status == 202, await response.text()
    return await wait_job(api, (await response.json())["job_id"])


async def scraped(api: ApiClient, **body: Any) -> dict[str, Any]:
    """A scrape that must complete: its result."""
    job = await scrape(api, **body)
    assert job["status"] == "complete", job
    result: dict[str, Any] = job["result"]
    return result


# -- selectors whatever the server answers ------------------------------------------------


async def test_selectors_new_to_a_page_that_answers_304_are_applied(
    api: ApiClient, worker: Worker, site: tuple[str, SiteStats]
) -> None:
    """A page scraped without selectors answers 304 to the next conditional request; asked
    with selectors, it is fetched unconditionally (the stored page had none extracted) and
    the matches are returned and stored; the same selectors again make a conditional request
    whose 304 returns the stored matches; `force` fetches unconditionally."""
    base, stats = site
    url, path = f"{base}/docs/1", "/docs/1"
    first = await scraped(api, url=url)
    assert (first["status"], first["extracted"]) == (200, {})

    plain = await scraped(api, url=url)
    assert (stats.conditional[path], stats.not_modified[path]) == (1, 1)
    assert (plain["status"], plain["extracted"], plain["title"]) == (304, {}, "Doc 1 v1")

    selected = await scraped(api, url=url, selectors={"h": "h1"})
    assert (stats.hits[path], stats.conditional[path]) == (3, 1)  # fetched, unconditionally
    assert (selected["status"], selected["changed"]) == (200, False)
    assert selected["extracted"] == {"h": ["Doc 1"]}

    # the same selectors (a plain string is {"css": ..., "all": true}): a conditional request
    same = await scraped(api, url=url, selectors={"h": {"css": "h1", "all": True}})
    assert (stats.hits[path], stats.conditional[path], stats.not_modified[path]) == (4, 2, 2)
    assert (same["status"], same["extracted"]) == (304, {"h": ["Doc 1"]})
    stored = await (await api.get(f"/documents/{document_id(url)}")).json()
    assert stored["document"]["extracted"] == {"h": ["Doc 1"]}

    forced = await scraped(api, url=url, selectors={"h": "h1"}, force=True)
    assert (stats.hits[path], stats.conditional[path]) == (5, 2)
    assert (forced["status"], forced["extracted"]) == (200, {"h": ["Doc 1"]})


async def test_other_selectors_over_a_stored_page_replace_its_matches(
    api: ApiClient, worker: Worker, site: tuple[str, SiteStats]
) -> None:
    """Unchanged text used to keep the first extraction: the second selectors' matches were
    returned but never stored."""
    base, stats = site
    url = f"{base}/docs/2"
    await scraped(api, url=url, selectors={"h": "h1"})
    other = await scraped(api, url=url, selectors={"next": {"css": "a.next", "attr": "href"}})
    assert stats.hits["/docs/2"] == 2 and "/docs/2" not in stats.conditional
    assert other["extracted"] == {"next": f"{base}/docs/3"} and other["changed"] is False
    stored = await (await api.get(f"/documents/{document_id(url)}")).json()
    assert stored["document"]["extracted"] == {"next": f"{base}/docs/3"}


# -- attributes, lists, links, metadata ----------------------------------------------------

RICH_SELECTORS: dict[str, Any] = {
    "hrefs": {"css": "a.item", "attr": "href", "all": True},
    "first_href": {"css": "a.item", "attr": "href"},
    "images": {"css": "img", "attr": "src", "all": True},
    "og_type": {"css": 'meta[property="og:type"]', "attr": "content"},
    "heading": "h1",
    "first_item": {"css": "a.item"},
    "nothing": {"css": "table"},
    "nothing_at_all": {"css": "table", "all": True},
    "no_such_attribute": {"css": "h1", "attr": "data-x"},
}


async def test_attributes_lists_links_and_metadata(
    api: ApiClient, worker: Worker, site: tuple[str, SiteStats]
) -> None:
    base, _ = site
    url = f"{base}/rich"
    result = await scraped(api, url=url, selectors=RICH_SELECTORS)
    # URL attributes are absolute, against the page's <base href="/base/">
    assert result["extracted"] == {
        "hrefs": [f"{base}/base/one", f"{base}/two#part", "https://example.org/three",
                  f"{base}/base/one"],  # every match with the attribute, in page order
        "first_href": f"{base}/base/one",
        "images": [f"{base}/base/pics/a.png", f"{base}/pics/b.png"],
        "og_type": "article",
        "heading": ["Rich"],
        "first_item": "One",
        "nothing": None,
        "nothing_at_all": [],
        "no_such_attribute": None,
    }  # fmt: skip
    # http(s) links only, absolute, each once, without fragments
    assert result["links"] == [f"{base}/base/one", f"{base}/two", "https://example.org/three"]
    assert result["links_count"] == 6
    assert result["metadata"] == {
        "canonical": f"{base}/rich?canonical=1",
        "og": {"title": "OG title", "type": "article", "image": "https://cdn.example.org/i.png"},
        "json_ld": [
            {"@type": "Article", "headline": "JSON-LD headline"},
            [{"@type": "BreadcrumbList"}, {"@type": "Person"}],
        ],
        "json_ld_skipped": 1,  # the block with a trailing comma
    }
    detail = await (await api.get(f"/documents/{document_id(url)}")).json()
    assert detail["document"]["metadata"] == result["metadata"]
    listed = await (await api.get("/documents")).json()
    assert listed["items"][0]["metadata"] == {}  # lists leave it out, as the text

    again = await scraped(api, url=url, selectors=RICH_SELECTORS)  # no validators: a 200
    assert (again["changed"], again["extracted"]) == (False, result["extracted"])


async def test_matches_past_the_size_cap_fail_the_scrape_with_the_reason(
    api: ApiClient, worker: Worker, site: tuple[str, SiteStats], redis: ArqRedis
) -> None:
    base, _ = site
    items = MAX_EXTRACTED_CHARS // 9_000 + 1
    every_item = {"li": {"css": "li", "all": True}}
    job = await scrape(api, url=f"{base}/list?items={items}&size=9000", selectors=every_item)
    assert job["status"] == "failed" and "narrow them" in job["error"], job
    assert await redis.hgetall(SCRAPE_FAILURES_KEY) == {b"selector_limit": b"1"}  # type: ignore[misc]
    fits = await scraped(api, url=f"{base}/list?items=3&size=9000", selectors={"li": "li"})
    assert fits["extracted"] == {"li": ["x" * 9000] * 3}


@pytest.mark.parametrize(
    ("selectors", "field", "text"),
    [
        ({"x": {"css": "a", "attr": "no spaces"}}, "selectors.x.attr", "should match pattern"),
        ({"x": {"css": "a", "colour": "red"}}, "selectors.x.colour", "extra inputs"),
        ({"x": {"css": "a", "all": "sometimes"}}, "selectors.x.all", "valid boolean"),
        ({"x": {"attr": "href"}}, "selectors.x.css", "field required"),
        ({"x": {"css": ""}}, "selectors.x.css", "at least 1 character"),
        ({"x": 5}, "selectors.x", "valid dictionary"),
        ({"x": {"css": "p[["}}, "selectors", "not a valid CSS selector"),
        ({"x": "p[["}, "selectors", "not a valid CSS selector"),
        ({f"s{n}": "p" for n in range(51)}, "selectors", "at most 50 items"),
    ],
)
async def test_bad_selector_specs_are_422_naming_the_field(
    api: ApiClient, redis: ArqRedis, selectors: dict[str, Any], field: str, text: str
) -> None:
    for path, body in [
        ("/jobs/scrape", {"url": "http://example.com/", "selectors": selectors}),
        ("/sources", {"url": "http://example.com/", "schedule": "daily", "selectors": selectors}),
    ]:
        response = await api.post(path, json=body)
        assert response.status == 422, (path, await response.text())
        details = {d["field"]: d["message"] for d in (await response.json())["details"]}
        assert field in details and text.lower() in details[field].lower(), (path, details)
    assert await redis.zcard("arq:queue") == 0


async def test_force_must_be_a_boolean(api: ApiClient) -> None:
    body = {"url": "http://example.com/", "force": "sometimes"}
    response = await api.post("/jobs/scrape", json=body)
    assert response.status == 422
    assert [d["field"] for d in (await response.json())["details"]] == ["force"]


async def test_a_source_keeps_its_selector_specs_as_given(api: ApiClient) -> None:
    selectors = {"h": "h1", "links": {"css": "a", "attr": "href", "all": True}}
    body = {"url": "http://example.com/", "schedule": "daily", "selectors": selectors}
    created = await (await api.post("/sources", json=body)).json()
    assert created["selectors"] == selectors
    shown = await (await api.get(f"/sources/{created['id']}")).json()
    assert shown["selectors"] == created["selectors"]


# -- encodings ------------------------------------------------------------------------------

SHORT_CP1252 = [
    "Café déjà vu",  # was cp1257: "déją"
    "Noël à la plage",
    "crème brûlée",
    "L'été où j'ai été là",
    "Grüße aus München",  # was cp1250
    "Straße",  # was UTF-16
    "Über Äpfel und Öl",
    "¿Qué tal? Mañana, señor",
    "El niño pequeño",
    "“Smart” quotes cost 5 €",
]


@pytest.mark.parametrize("text", SHORT_CP1252)
async def test_short_undeclared_latin_pages_read_as_windows_1252(
    make_ctx: Callable[..., Ctx], site: tuple[str, SiteStats], text: str
) -> None:
    """Served as `Content-Type: text/html`, no charset, no <meta>: detection alone guessed
    another code page on most of these."""
    base, stats = site
    url = f"{base}/encoded?{urlencode({'text': text, 'as': 'cp1252'})}"
    result = await scrape_page(make_ctx(), {"url": url})
    assert (result["title"], result["encoding"]) == (text, "cp1252")
    assert stats.hits["/encoded"] == 1


FRENCH = "Les élèves ont été très sages pendant la journée à l'école, malgré la pluie. " * 40
CZECH = "Příliš žluťoučký kůň úpěl ďábelské ódy. " * 5
RUSSIAN = "Съешь же ещё этих мягких французских булок, да выпей чаю. Москва — столица России."


@pytest.mark.parametrize(
    ("text", "encoding", "read_as"),
    [
        (FRENCH, "cp1252", "cp1252"),  # a long page: detection ranked windows-1250 first
        ("Café déjà vu, crème brûlée", "utf-8", "utf-8"),  # UTF-8 was read as hp-roman8
        (CZECH, "cp1250", "cp1250"),  # "ť" is not in windows-1252
        ("Zażółć gęślą jaźń", "cp1250", "cp1250"),  # "ż" would read "¿", inside a word
        (RUSSIAN, "cp1251", "cp1251"),  # whole words of accented letters are not Latin
        ("日本語のページです。" * 5, "shift_jis", "cp932"),
    ],
)
def test_undeclared_pages_in_other_encodings_keep_being_detected(
    text: str, encoding: str, read_as: str
) -> None:
    body = f"<html><head><title>t</title></head><body><p>{text}</p></body></html>".encode(encoding)
    assert sniff_encoding(body, None) == read_as


# -- typed failure reasons ----------------------------------------------------------------


async def test_failures_count_once_by_typed_reason_in_the_report(
    api: ApiClient, worker: Worker, site: tuple[str, SiteStats], redis: ArqRedis
) -> None:
    """Ten scrapes fail for good (three after their retries): each counts once, by its
    reason; the daily report's ad-hoc row showed "none" for them."""
    base, stats = site
    failing = {
        f"{base}/docs/9": "http_4xx",
        f"{base}/json": "not_html",
        f"{base}/huge": "too_big",
        f"{base}/error": "http_5xx",  # retried, then failed
        f"{base}/loop": "redirects",
        "http://127.0.0.1:1/": "connect",  # retried
        "http://no-such-host.invalid/": "dns",  # retried
        "http://10.1.2.3/": "blocked_by_guard",
        "http://[::ffff:10.0.0.1]/": "blocked_by_guard",
    }
    for url in failing:
        job = await scrape(api, url=url)
        assert job["status"] == "failed", (url, job)
    job = await scrape(api, url=f"{base}/list?items=40&size=9000", selectors={"li": "li"})
    assert job["status"] == "failed"
    assert stats.hits["/error"] == 3  # SCRAPE_MAX_TRIES: one count, not three

    counts = await redis.hgetall(SCRAPE_FAILURES_KEY)  # type: ignore[misc]
    expected = dict(Counter([*failing.values(), "selector_limit"]))
    assert {k.decode(): int(v) for k, v in counts.items()} == expected

    report = await api.post("/jobs/report")
    assert (await wait_job(api, (await report.json())["job_id"]))["status"] == "complete"
    latest = await (await api.get("/reports/latest")).json()
    assert latest["sources"]["ad-hoc"]["failures"] == dict(sorted(expected.items()))
    page = LexborHTMLParser(await (await api.get("/reports/latest.html")).text())
    rows = {row.css("td")[0].text(strip=True): row.css("td")[-1].text(strip=True)
            for row in page.css("table")[0].css("tbody tr")}  # fmt: skip
    assert rows["ad-hoc"] == ", ".join(f"{k}: {v}" for k, v in sorted(expected.items()))

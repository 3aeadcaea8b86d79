"""The scrape target: every page waits 50 ms, then returns about 2 KB of HTML (a slow origin).

Run as `python -m bench.site --port N`: a process of its own, so serving pages does not compete
with the bench's load generator or the measured worker in one event loop.
`/slow/{ms}/page/{n}` is the same page after `ms` milliseconds (to hold many requests in
flight). `POST /task/{n}` (the http workload) reads its body, waits the same 50 ms and answers
a small JSON object; it counts as a page. `/robots.txt` allows everything; `GET /_stats` says
how many pages were served and the most requests that were in flight at once (the concurrency
a scraper reached), `POST /_reset` zeroes both.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable

from aiohttp import web

from bench.common import PAGE_DELAY_S

PARAGRAPH = (
    "<p>Asynchronous job queues move slow work out of the request path. This paragraph is "
    'filler of a realistic size, with <a href="/page/{link}">a link</a> inside it.</p>\n'
)


def page_html(n: str) -> str:
    """About 2 KB: a title, a description, some links and paragraphs, a script to strip."""
    body = "".join(PARAGRAPH.format(link=i) for i in range(8))
    return (
        "<!doctype html>\n<html><head>"
        f"<title>Bench page {n}</title>"
        '<meta name="description" content="A page of the asyncjobs benchmark site">'
        '<script>var ignored = "not text";</script></head>\n'
        f"<body><h1>Page {n}</h1>\n{body}"
        '<footer><a href="/">home</a> <a href="https://example.org/">elsewhere</a></footer>'
        "</body></html>\n"
    )


STATS = web.AppKey("stats", dict[str, int])


def make_app() -> web.Application:
    app = web.Application()
    app[STATS] = stats = {"pages": 0, "in_flight": 0, "max_in_flight": 0}

    async def page(request: web.Request) -> web.Response:
        n = request.match_info["n"]
        return await after_delay(
            request, lambda: web.Response(text=page_html(n), content_type="text/html")
        )

    async def after_delay(request: web.Request, answer: Callable[[], web.Response]) -> web.Response:
        """`answer()` after the page delay, counted in flight meanwhile and served after."""
        stats["in_flight"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        delay_ms = request.match_info.get("ms")
        try:
            await asyncio.sleep(int(delay_ms) / 1000 if delay_ms else PAGE_DELAY_S)
        finally:
            stats["in_flight"] -= 1
        stats["pages"] += 1
        return answer()

    async def task(request: web.Request) -> web.Response:
        await request.read()
        return await after_delay(request, lambda: web.json_response({"ok": True}))

    async def robots(request: web.Request) -> web.Response:
        return web.Response(text="User-agent: *\nAllow: /\n", content_type="text/plain")

    async def show(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def reset(request: web.Request) -> web.Response:
        stats["pages"] = stats["max_in_flight"] = 0
        return web.json_response(stats)

    app.router.add_get("/page/{n}", page)
    app.router.add_get("/slow/{ms:[0-9]+}/page/{n}", page)
    app.router.add_post("/task/{n}", task)
    app.router.add_get("/robots.txt", robots)
    app.router.add_get("/_stats", show)
    app.router.add_post("/_reset", reset)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.site", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # No access log (a line per request would cost more than the page); a deep accept backlog,
    # because 500 jobs connecting at once overflow the default 128 and stall in SYN retries.
    web.run_app(
        make_app(), host="127.0.0.1", port=args.port, access_log=None, backlog=4096, print=None
    )


if __name__ == "__main__":
    main()

"""One message of the dev mail sink, opened as Mailpit opens it: its headers, its text, its HTML
in a sandboxed iframe, its attachments to download.

The HTML is whatever a job sent, so it never runs as the dashboard: the iframe has `sandbox`
without allow-scripts (an opaque origin, no scripts, no forms), and its document is served with
a Content-Security-Policy of its own that loads nothing from anywhere (images inline as data:
only) and sandboxes it again if it is opened on its own. Attachments are served as downloads."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from app import mailsink
from app.dashboard.views import render
from app.state import SETTINGS

# The message's HTML: no scripts, no requests, a frame of the dashboard only (same origin).
MAIL_HTML_POLICY = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:; "
    "frame-ancestors 'self'; base-uri 'none'; form-action 'none'; sandbox"
)
# An attachment is a download (Content-Disposition); were it shown anyway, it loads nothing.
# Not `sandbox`: Chromium refuses downloads from a sandboxed response.
DOWNLOAD_POLICY = "default-src 'none'"


def _folder(request: web.Request) -> Path:
    folder = request.config_dict[SETTINGS].mail_sink_dir
    assert folder is not None  # the routes exist only then
    folder_path: Path = folder
    return folder_path


async def _raw(request: web.Request) -> bytes:
    raw = await mailsink.read_message(_folder(request), request.match_info["name"])
    if raw is None:
        raise web.HTTPNotFound(text="No such message in the mail sink (deleted?).")
    return raw


async def message_page(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    message = await asyncio.to_thread(mailsink.open_message, await _raw(request))
    router = request.app.router
    context = {
        "name": name,
        "message": message,
        "html_url": str(router["mail_html"].url_for(name=name)),
        "attachment_urls": [
            str(router["mail_attachment"].url_for(name=name, index=str(a.index)))
            for a in message.attachments
        ],
    }
    return render(request, "mail_message.html", context)


async def message_html(request: web.Request) -> web.Response:
    message = await asyncio.to_thread(mailsink.open_message, await _raw(request))
    if message.html is None:
        raise web.HTTPNotFound(text="This message has no HTML part.")
    headers = {"Content-Security-Policy": MAIL_HTML_POLICY, "X-Frame-Options": "SAMEORIGIN"}
    return web.Response(text=message.html, content_type="text/html", headers=headers)


async def message_attachment(request: web.Request) -> web.Response:
    raw = await _raw(request)
    found = await asyncio.to_thread(mailsink.attachment, raw, int(request.match_info["index"]))
    if found is None:
        raise web.HTTPNotFound(text="No such attachment.")
    info, data = found
    headers = {
        # RFC 6266: the name as UTF-8, percent-encoded; never the raw name in the header
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(info.filename, safe='')}",
        "Content-Security-Policy": DOWNLOAD_POLICY,
    }
    return web.Response(body=data, content_type=info.content_type, headers=headers)


def add_mail_routes(app: web.Application) -> None:
    message = f"/mail/{{name:{mailsink.MESSAGE_NAME_PATTERN}}}"
    app.router.add_get(message, message_page, name="mail_message")
    app.router.add_get(f"{message}/html", message_html, name="mail_html")
    app.router.add_get(
        f"{message}/attachments/{{index:[0-9]{{1,4}}}}", message_attachment, name="mail_attachment"
    )

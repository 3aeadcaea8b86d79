"""Pages in the encodings real sites use, served as raw bytes by a loopback site: each stored
with its real text, and the encoding it was read with recorded."""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from jobs.scrape.documents import document_id, load_document
from jobs.scrape.encoding import decode_page, sniff_encoding
from jobs.scrape.page import scrape_page
from tests.conftest import Ctx

CAFE = "Café crème"
QUOTES = "“Smart” quotes cost 5 €"
JAPANESE = "日本語のページ"

# path -> (body bytes, Content-Type header)
PAGES: dict[str, tuple[bytes, str]] = {
    # the header says nothing, the <meta> says Latin-1 (read as windows-1252, as browsers do)
    "/latin1": (
        f'<html><head><meta charset="iso-8859-1"><title>{CAFE}</title></head></html>'.encode(
            "latin-1"
        ),
        "text/html",
    ),
    # cp1252 bytes 0x93 0x94 0x80 under an http-equiv declaration
    "/cp1252": (
        b'<html><head><meta http-equiv="Content-Type" content="text/html; charset=windows-1252">'
        + f"<title>{QUOTES}</title></head></html>".encode("cp1252"),
        "text/html",
    ),
    "/shift_jis": (
        f'<html><head><meta charset="shift_jis"><title>{JAPANESE}</title></head></html>'.encode(
            "shift_jis"
        ),
        "text/html",
    ),
    # UTF-16 with a BOM and no declaration anywhere
    "/utf16": (
        codecs.BOM_UTF16_LE + f"<html><head><title>{CAFE}</title></head></html>".encode(
            "utf-16-le"
        ),
        "text/html",
    ),
    # the header and the <meta> disagree: the header wins (after a BOM, which this has not)
    "/disagree": (
        f'<html><head><meta charset="utf-8"><title>{CAFE}</title></head></html>'.encode("latin-1"),
        "text/html; charset=iso-8859-1",
    ),
    # declared UTF-8, with a byte that is not UTF-8: replaced, never an error
    "/invalid": (
        b"<html><head><title>ok \xff here</title></head></html>",
        "text/html; charset=utf-8",
    ),
    # nothing declared: detection
    "/undeclared": (
        f"<html><head><title>{JAPANESE}</title></head><body><p>{JAPANESE * 20}</p></body></html>"
        .encode("shift_jis"),
        "text/html",
    ),
}  # fmt: skip


@pytest.fixture
async def raw_site() -> AsyncIterator[str]:
    async def serve(request: web.Request) -> web.Response:
        body, content_type = PAGES[request.path]
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    for path in PAGES:
        app.router.add_get(path, serve)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("path", "title", "encoding"),
    [
        ("/latin1", CAFE, "cp1252"),
        ("/cp1252", QUOTES, "cp1252"),
        ("/shift_jis", JAPANESE, "shift_jis"),
        ("/utf16", CAFE, "utf-16-le"),
        ("/disagree", CAFE, "cp1252"),
        ("/invalid", "ok \ufffd here", "utf-8"),
        ("/undeclared", JAPANESE, None),  # detected: any codec that reads it right
    ],
)
async def test_pages_are_read_as_browsers_read_them(
    make_ctx: Callable[..., Ctx], raw_site: str, path: str, title: str, encoding: str | None
) -> None:
    ctx = make_ctx()
    result = await scrape_page(ctx, {"url": raw_site + path})
    assert result["title"] == title, result
    stored = await load_document(ctx.redis, document_id(raw_site + path))
    assert stored is not None and stored.title == title
    assert stored.encoding is not None
    if encoding is not None:
        assert stored.encoding == encoding


def test_a_bom_beats_every_declaration() -> None:
    body = codecs.BOM_UTF8 + '<meta charset="shift_jis"><title>Café</title>'.encode()
    assert sniff_encoding(body, "iso-8859-1") == "utf-8"
    text, encoding = decode_page(body, "iso-8859-1")
    assert (encoding, text.startswith("<meta")) == ("utf-8", True)  # the BOM is not text

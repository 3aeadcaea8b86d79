"""Image jobs with a real worker (Pillow in its CPU pool), a loopback image server and uploads;
every output read back with Pillow itself."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestServer
from arq.connections import ArqRedis
from PIL import Image

from asyncjobs.settings import Settings
from tests.conftest import AUTH, api_and_worker
from tests.helpers import ApiClient
from tests.jobwait import wait_job


def picture(width: int, height: int, fmt: str, mode: str = "RGB") -> bytes:
    image = Image.new(mode, (width, height), (200, 30, 30, 128)[: len(mode)])
    image.paste((20, 20, 220, 255)[: len(mode)], (0, 0, width // 2, height // 2))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds almost nothing: decoding it would
    allocate the whole canvas (a decompression bomb), reading its header does not."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


FILES = {
    "/photo.jpg": (picture(1200, 800, "JPEG"), "image/jpeg"),
    "/logo.png": (picture(300, 300, "PNG", "RGBA"), "image/png"),
    "/bomb.png": (png_header_only(100_000, 100_000), "image/png"),
    "/page.html": (b"<html><title>not an image</title></html>", "text/html"),
}


@pytest.fixture
async def image_site() -> AsyncIterator[str]:
    async def serve(request: web.Request) -> web.Response:
        body, ctype = FILES[request.path]
        return web.Response(body=body, content_type=ctype)

    app = web.Application()
    for path in FILES:
        app.router.add_get(path, serve)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


@pytest.fixture
async def stack(
    make_settings: Callable[..., Settings], redis: ArqRedis, tmp_path: Path
) -> AsyncIterator[tuple[ApiClient, Settings]]:
    settings = make_settings(images_dir=tmp_path / "images", image_max_pixels=20_000_000)
    async with api_and_worker(settings) as client:
        yield client, settings


def pixel(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    value = image.getpixel((x, y))
    assert isinstance(value, tuple)
    return value


async def download(api: ApiClient, job_id: str, name: str) -> Image.Image:
    response = await api.get(f"/images/{job_id}/{name}", headers=AUTH)
    assert response.status == 200
    image = Image.open(io.BytesIO(await response.read()))
    image.load()
    return image


async def run(api: ApiClient, **body: Any) -> dict[str, Any]:
    response = await api.post("/jobs/image", json=body, headers=AUTH)
    assert response.status == 202, await response.text()
    accepted = await response.json()
    assert accepted["images_url"] == f"/images/{accepted['job_id']}/"
    status: dict[str, Any] = await wait_job(api, accepted["job_id"])
    return status


async def test_the_default_outputs_of_an_image_url(
    stack: tuple[ApiClient, Settings], image_site: str
) -> None:
    """A 256-pixel JPEG thumbnail (3:2 kept) and a full-size WebP."""
    api, _ = stack
    status = await run(api, url=f"{image_site}/photo.jpg")
    assert status["status"] == "complete", status
    thumb, full = status["result"]["outputs"]
    assert (thumb["format"], thumb["width"], thumb["height"]) == ("jpeg", 256, 171)
    assert (full["format"], full["width"], full["height"]) == ("webp", 1200, 800)
    for output, pillow_format in ((thumb, "JPEG"), (full, "WEBP")):
        image = await download(api, status["job_id"], output["name"])
        assert image.format == pillow_format and image.size == (output["width"], output["height"])
        # the top-left quarter was painted blue, the rest red: resizing kept the picture
        rgb = image.convert("RGB")
        assert pixel(rgb, 2, 2)[2] > 150
        assert pixel(rgb, image.width - 3, image.height - 3)[0] > 150


async def test_an_upload_with_chosen_outputs(stack: tuple[ApiClient, Settings]) -> None:
    api, _ = stack
    form = FormData()
    form.add_field("image", picture(300, 300, "PNG", "RGBA"), filename="logo.png")
    outputs = '[{"format": "png", "width": 100}, {"format": "jpeg", "width": 50, "quality": 60}]'
    form.add_field("outputs", outputs)
    response = await api.post("/jobs/image", data=form, headers=AUTH)
    assert response.status == 202, await response.text()
    job_id = (await response.json())["job_id"]
    status = await wait_job(api, job_id)
    assert status["status"] == "complete", status
    png, jpeg = status["result"]["outputs"]
    image = await download(api, job_id, png["name"])
    assert (image.format, image.mode, image.size) == ("PNG", "RGBA", (100, 100))
    assert pixel(image, 90, 90)[3] == 128  # transparency kept
    image = await download(api, job_id, jpeg["name"])
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (50, 50))


async def test_a_decompression_bomb_is_refused_before_it_is_decoded(
    stack: tuple[ApiClient, Settings], image_site: str
) -> None:
    api, _ = stack
    status = await run(api, url=f"{image_site}/bomb.png")
    assert status["status"] == "failed"
    assert "100000x100000 is more than 20,000,000 pixels" in status["error"]


async def test_what_is_not_an_image_fails_for_good(
    stack: tuple[ApiClient, Settings], image_site: str
) -> None:
    api, _ = stack
    status = await run(api, url=f"{image_site}/page.html")
    assert status["status"] == "failed" and status["tries"] == 1
    assert "not an image" in status["error"]


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"image_max_bytes": 1000}, "larger than the 1000 byte limit"),  # not read whole
        ({"scrape_allowed_cidrs": []}, "not a public address"),  # the scraper's SSRF guard
    ],
)
async def test_image_urls_are_fetched_within_the_scrapers_limits(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    image_site: str,
    overrides: dict[str, Any],
    error: str,
) -> None:
    async with api_and_worker(make_settings(**overrides)) as api:
        status = await run(api, url=f"{image_site}/photo.jpg")
    assert status["status"] == "failed" and error in status["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "https://example.com/a.png", "outputs": []}, "outputs"),
        ({"url": "https://example.com/a.png", "outputs": [{"format": "bmp"}]}, "outputs.0.format"),
        ({"url": "https://example.com/a.png", "outputs": [{"format": "png", "width": 5000}]},
         "outputs.0.width"),
        ({"url": "file:///etc/passwd"}, "url"),
    ],
)  # fmt: skip
async def test_bad_image_requests_are_422_naming_the_field(
    api: ApiClient, redis: ArqRedis, body: dict[str, Any], field: str
) -> None:
    response = await api.post("/jobs/image", json=body, headers=AUTH)
    assert response.status == 422
    assert [d["field"] for d in (await response.json())["details"]] == [field]


async def test_an_upload_needs_its_image_part(api: ApiClient, redis: ArqRedis) -> None:
    form = FormData(default_to_multipart=True)
    form.add_field("outputs", "[]")
    response = await api.post("/jobs/image", data=form, headers=AUTH)
    assert response.status == 422 and "no 'image' part" in await response.text()
    assert (await api.post("/jobs/image", json={}, headers=AUTH)).status == 422

"""Image jobs and what formats can lose: transparency made into JPEG (flattened on white, or on
the `background` asked for), animations (kept in GIF and WebP, said to be cut to one frame in
JPEG and PNG, and counted frame by frame against IMAGE_MAX_PIXELS), SVG (refused by name) and
the 4096-pixel cap. Real API and worker; every output downloaded and read back with Pillow."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestServer
from arq.connections import ArqRedis
from PIL import Image, ImageSequence

from asyncjobs.errors import PermanentJobError
from asyncjobs.settings import Settings
from jobs.images import MAX_SIDE, render_images
from tests.conftest import api_and_worker
from tests.helpers import ApiClient
from tests.housekeeping.test_images import download, pixel
from tests.jobwait import wait_job

RED, WHITE = (255, 0, 0), (255, 255, 255)
SVG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<!-- a drawing -->\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="5" '
    b'height="5" fill="red"/></svg>'
)
SVG_ERROR = "SVG is not supported: upload PNG, JPEG, GIF or WebP"


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def half_transparent_png(mode: str = "RGBA") -> bytes:
    """200x100: a red square top left, the rest fully transparent (its pixels store black)."""
    image = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
    image.paste((*RED, 255), (0, 0, 50, 50))
    if mode == "P":  # a palette with one transparent entry, as many PNG optimisers write
        palette = image.convert("RGB").quantize(4)
        index = palette.getpixel((150, 50))
        return encoded(palette, "PNG", transparency=index)
    return encoded(image, "PNG")


DURATIONS = [100, 200, 300, 400]


def animated_gif(transparent: bool = False, size: tuple[int, int] = (80, 40)) -> bytes:
    """Four frames, a 20-pixel-wide red band moving right, on white or on nothing."""
    width, height = size
    frames = []
    for i in range(4):
        frame = Image.new("RGBA", size, (0, 0, 0, 0) if transparent else (*WHITE, 255))
        frame.paste((*RED, 255), (i * width // 4, 0, (i + 1) * width // 4, height))
        frames.append(frame)
    return encoded(
        frames[0], "GIF", save_all=True, append_images=frames[1:], duration=DURATIONS, loop=0,
        disposal=2,
    )  # fmt: skip


@pytest.fixture
async def stack(
    make_settings: Callable[..., Settings], redis: ArqRedis, tmp_path: Path
) -> AsyncIterator[ApiClient]:
    async with api_and_worker(make_settings(images_dir=tmp_path / "images")) as client:
        yield client


async def upload(api: ApiClient, data: bytes, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    form = FormData()
    form.add_field("image", data, filename="upload", content_type="application/octet-stream")
    form.add_field("outputs", json.dumps(outputs))
    response = await api.post("/jobs/image", data=form)
    assert response.status == 202, await response.text()
    status: dict[str, Any] = await wait_job(api, (await response.json())["job_id"])
    return status


async def completed(api: ApiClient, data: bytes, outputs: list[dict[str, Any]]) -> Any:
    """The finished job's status and its outputs downloaded, in order."""
    status = await upload(api, data, outputs)
    assert status["status"] == "complete", status
    images = [await download(api, status["job_id"], o["name"]) for o in status["result"]["outputs"]]
    return status, images


def close_to(actual: tuple[int, ...], wanted: tuple[int, ...], slack: int = 8) -> bool:
    """JPEG is lossy: a flat colour comes back within a few levels."""
    return all(abs(a - w) <= slack for a, w in zip(actual, wanted, strict=True))


@pytest.mark.parametrize("mode", ["RGBA", "P"])
async def test_transparency_made_into_jpeg_is_white_or_the_background_asked_for(
    stack: ApiClient, mode: str
) -> None:
    outputs: list[dict[str, Any]] = [
        {"format": "jpeg"},
        {"format": "jpeg", "width": 100, "background": "#1040c0"},
        {"format": "png", "background": "#1040c0"},  # asked for: PNG is flattened too
        {"format": "png"},  # not asked for: PNG keeps its transparency
    ]
    status, (white, blue, flat_png, png) = await completed(
        stack, half_transparent_png(mode), outputs
    )
    assert (white.format, white.mode, white.size) == ("JPEG", "RGB", (200, 100))
    for x, y in [(60, 10), (199, 99), (120, 60), (10, 90)]:  # was transparent
        assert close_to(pixel(white, x, y), WHITE), (x, y, pixel(white, x, y))
        assert close_to(pixel(blue, x // 2, y // 2), (0x10, 0x40, 0xC0)), (x, y)
        assert pixel(flat_png, x, y) == (0x10, 0x40, 0xC0)
        assert pixel(png.convert("RGBA"), x, y)[3] == 0
    assert close_to(pixel(white, 20, 20), RED) and close_to(pixel(blue, 10, 10), RED)
    assert flat_png.mode == "RGB" and pixel(flat_png, 20, 20) == RED
    assert [o["frames"] for o in status["result"]["outputs"]] == [1, 1, 1, 1]
    assert all("note" not in o for o in status["result"]["outputs"])


async def test_a_background_must_be_a_hex_colour(api: ApiClient, redis: ArqRedis) -> None:
    for colour in ["white", "#fff", "#12345g", "#1234567"]:
        output = {"format": "jpeg", "background": colour}
        body = {"url": "https://example.com/a.png", "outputs": [output]}
        response = await api.post("/jobs/image", json=body)
        assert response.status == 422, colour
        fields = [d["field"] for d in (await response.json())["details"]]
        assert fields == ["outputs.0.background"]


def frames_of(image: Image.Image) -> list[Image.Image]:
    """Each frame as RGBA, with its duration in info."""
    frames = []
    for frame in ImageSequence.Iterator(image):
        frame.load()  # WebP sets a frame's duration when it is decoded
        rgba = frame.convert("RGBA")
        rgba.info["duration"] = frame.info.get("duration")
        frames.append(rgba)
    return frames


def red_band(frame: Image.Image) -> int:
    """Which quarter of the width the red band is in."""
    quarters = [pixel(frame, (2 * q + 1) * frame.width // 8, frame.height // 2) for q in range(4)]
    reds = [q for q, px in enumerate(quarters) if close_to(px[:3], RED, 40) and px[3] > 200]
    assert len(reds) == 1, quarters
    return reds[0]


@pytest.mark.parametrize("transparent", [False, True], ids=["opaque", "transparent"])
async def test_an_animated_gif_stays_animated_in_gif_and_webp(
    stack: ApiClient, transparent: bool
) -> None:
    outputs: list[dict[str, Any]] = [{"format": "gif", "width": 40}, {"format": "webp"}]
    status, (gif, webp) = await completed(stack, animated_gif(transparent), outputs)
    results = status["result"]["outputs"]
    assert [(o["format"], o["width"], o["height"], o["frames"]) for o in results] == [
        ("gif", 40, 20, 4),
        ("webp", 80, 40, 4),
    ]
    assert all("note" not in o for o in results)
    for image, size in [(gif, (40, 20)), (webp, (80, 40))]:
        assert getattr(image, "n_frames", 1) == 4 and image.size == size
        assert image.info.get("loop") == 0  # forever, as the source
        frames = frames_of(image)
        assert [f.info["duration"] for f in frames] == DURATIONS
        assert [red_band(f) for f in frames] == [0, 1, 2, 3]  # each frame resized, in order
        for index, frame in enumerate(frames):  # where the band is not: as the source was
            x = ((index + 2) % 4 * 2 + 1) * frame.width // 8
            rest = pixel(frame, x, frame.height // 2)
            assert rest[3] == 0 if transparent else close_to(rest, (*WHITE, 255), 12), rest


async def test_jpeg_and_png_of_an_animation_say_only_the_first_frame_was_used(
    stack: ApiClient,
) -> None:
    status, (jpeg, png) = await completed(
        stack, animated_gif(), [{"format": "jpeg"}, {"format": "png"}]
    )
    for output, image in zip(status["result"]["outputs"], (jpeg, png), strict=True):
        assert output["frames"] == 1
        assert output["note"].startswith("only the first of 4 frames was used")
        assert getattr(image, "n_frames", 1) == 1 and red_band(image.convert("RGBA")) == 0


async def test_an_animation_counts_every_frame_against_image_max_pixels(
    make_settings: Callable[..., Settings], redis: ArqRedis, tmp_path: Path
) -> None:
    """4 frames of 80x40 are 12,800 pixels: over a 10,000 limit when every frame is decoded
    (GIF or WebP wanted), within it when only the first is (3,200 pixels)."""
    settings = make_settings(images_dir=tmp_path / "images", image_max_pixels=10_000)
    async with api_and_worker(settings) as api:
        status = await upload(api, animated_gif(), [{"format": "webp"}])
        assert status["status"] == "failed" and status["tries"] == 1
        assert "4 frames of 80x40 are more than 10,000 pixels" in status["error"]
        status, [jpeg] = await completed(api, animated_gif(), [{"format": "jpeg"}])
        assert jpeg.size == (80, 40) and status["result"]["outputs"][0]["frames"] == 1


def test_a_gif_of_many_frames_is_refused_before_they_are_decoded() -> None:
    """100 frames of 300x300 in a small file: refused from the frame headers."""
    frames = [Image.new("L", (300, 300), i % 2 * 255) for i in range(100)]  # none alike
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert len(data) < 100_000
    with pytest.raises(PermanentJobError, match="100 frames of 300x300 are more than 5,000,000"):
        render_images(data, [{"format": "gif"}], 5_000_000)


@pytest.fixture
async def svg_site() -> AsyncIterator[str]:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=SVG, content_type="image/svg+xml")

    app = web.Application()
    app.router.add_get("/drawing.svg", serve)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}/drawing.svg"
    await server.close()


async def test_an_svg_is_refused_with_a_clear_message(stack: ApiClient, svg_site: str) -> None:
    """By upload and by URL: the error says what to send instead, and shows no Python repr."""
    by_upload = await upload(stack, SVG, [{"format": "png"}])
    response = await stack.post("/jobs/image", json={"url": svg_site})
    assert response.status == 202
    by_url = await wait_job(stack, (await response.json())["job_id"])
    for status in (by_upload, by_url):
        assert (status["status"], status["tries"]) == ("failed", 1)
        assert status["error"].endswith(SVG_ERROR) and "object at 0x" not in status["error"]


async def test_anything_else_unreadable_names_what_is_taken(stack: ApiClient) -> None:
    status = await upload(stack, b"%PDF-1.7 not a picture", [{"format": "png"}])
    assert status["status"] == "failed"
    assert status["error"].endswith("not an image this job can read: upload PNG, JPEG, GIF or WebP")
    assert "object at 0x" not in status["error"]


async def test_the_4096_pixel_cap_is_said_and_applies_to_full_size_versions(
    stack: ApiClient,
) -> None:
    for field in ("width", "height"):
        body = {"url": "https://example.com/a.png", "outputs": [{"format": "png", field: 4097}]}
        response = await stack.post("/jobs/image", json=body)
        assert response.status == 422
        [detail] = (await response.json())["details"]
        assert detail["field"] == f"outputs.0.{field}"
        assert detail["message"] == "at most 4096 pixels: versions are made at most 4096x4096"
    wide = encoded(Image.new("RGB", (6000, 300), RED), "PNG")
    status, [full] = await completed(stack, wide, [{"format": "png"}])  # no box: the original
    assert full.size == (MAX_SIDE, 205) and status["result"]["outputs"][0]["width"] == MAX_SIDE

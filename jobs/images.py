"""Image jobs: fetch an image (through the scraper's SSRF guard and politeness) or take an
upload, and write resized versions in JPEG, PNG or WebP, downloadable like exports.

Decoding and resizing are CPU work whose cost the input decides, so they run in the worker's
CPU pool (jobs/cpulimit.py), under CPU_LIMIT_SECONDS, never in the event loop. Limits: the
image's bytes (IMAGE_MAX_BYTES for a URL, MAX_BODY_BYTES for an upload) and its pixels
(IMAGE_MAX_PIXELS, checked from the header before anything is decoded: a decompression bomb is
refused, never expanded).
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator
from redis.asyncio import Redis

from asyncjobs.errors import PermanentJobError
from asyncjobs.keys import UPLOAD_KEY_PREFIX
from jobs.context import WorkerContext
from jobs.retry import builtin
from jobs.scrape.page import MAX_URL_LENGTH

ImageFormat = Literal["jpeg", "png", "webp"]
INPUT_FORMATS = {"JPEG", "PNG", "WEBP", "GIF"}
MAX_SIDE = 4096
MAX_OUTPUTS = 10
UPLOAD_TTL_S = 24 * 3600
JOB_ID_PATTERN = r"[0-9a-f]{32}"
# No anchors, no capturing groups: it is also used inside an aiohttp route pattern.
IMAGE_NAME_PATTERN = r"[0-9]{1,2}-[0-9]{1,4}x[0-9]{1,4}\.(?:jpeg|png|webp)"
CONTENT_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


class ImageOutput(BaseModel):
    """One version to write: a format, and a box it must fit in (the aspect ratio is kept and
    an image is never enlarged); no box keeps the original size."""

    model_config = ConfigDict(extra="forbid")

    format: ImageFormat
    width: int | None = Field(None, ge=1, le=MAX_SIDE)
    height: int | None = Field(None, ge=1, le=MAX_SIDE)
    quality: int = Field(85, ge=1, le=100, description="JPEG and WebP")


DEFAULT_OUTPUTS = [
    ImageOutput(format="jpeg", width=256, height=256),  # a thumbnail
    ImageOutput(format="webp"),
]


class ImageSpec(BaseModel):
    """`POST /jobs/image` as JSON: the image's `url` and the `outputs` wanted."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl | None = Field(None, max_length=MAX_URL_LENGTH)
    outputs: list[ImageOutput] = Field(
        default_factory=lambda: list(DEFAULT_OUTPUTS), min_length=1, max_length=MAX_OUTPUTS
    )


class ImageUploadSpec(BaseModel):
    """The `outputs` part of an upload."""

    model_config = ConfigDict(extra="forbid")

    outputs: list[ImageOutput] = Field(
        default_factory=lambda: list(DEFAULT_OUTPUTS), min_length=1, max_length=MAX_OUTPUTS
    )


class ImageJob(BaseModel):
    """The job's arguments: where the image comes from, and the outputs."""

    url: str | None = None
    upload_id: str | None = None
    outputs: list[ImageOutput]

    @model_validator(mode="after")
    def _one_source(self) -> ImageJob:
        if (self.url is None) == (self.upload_id is None):
            raise ValueError("give exactly one of 'url' or 'upload_id'")
        return self


def image_name(index: int, width: int, height: int, fmt: ImageFormat) -> str:
    return f"{index}-{width}x{height}.{fmt}"


def render_images(
    data: bytes, outputs: list[dict[str, Any]], max_pixels: int
) -> list[tuple[bytes, int, int]]:
    """Decode once, then encode each output: (bytes, width, height) per output. Runs in a pool
    process; a bad or oversized image is a PermanentJobError."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(io.BytesIO(data))
            if opened.format not in INPUT_FORMATS:
                raise PermanentJobError(
                    f"{opened.format} images are not taken (JPEG, PNG, WebP, GIF)"
                )
            if opened.width * opened.height > max_pixels:
                raise PermanentJobError(too_many_pixels(opened.width, opened.height, max_pixels))
            image = ImageOps.exif_transpose(opened)  # as a camera held it, then EXIF is gone
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            # Pillow's own check, from the header (over twice the limit it refuses to open)
            raise PermanentJobError(too_many_pixels(*_header_size(data), max_pixels)) from None
        except UnidentifiedImageError as exc:
            raise PermanentJobError(f"not an image this job can read: {exc}") from None
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
            raise PermanentJobError(f"the image could not be decoded: {exc}") from None
    return [_encode(image, ImageOutput.model_validate(spec)) for spec in outputs]


def too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    return f"{width}x{height} is more than {max_pixels:,} pixels (IMAGE_MAX_PIXELS): not decoded"


def _header_size(data: bytes) -> tuple[int, int]:
    """The size an image declares, read with Pillow's own limit off (nothing is decoded)."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _encode(image: Image.Image, output: ImageOutput) -> tuple[bytes, int, int]:
    version = image.copy()
    if output.width or output.height:
        version.thumbnail((output.width or MAX_SIDE, output.height or MAX_SIDE))
    if output.format == "jpeg" and version.mode not in ("RGB", "L"):
        version = version.convert("RGB")  # JPEG has no alpha
    elif version.mode == "P":
        version = version.convert("RGBA")
    buffer = io.BytesIO()
    options: dict[str, Any] = {"optimize": True}
    if output.format in ("jpeg", "webp"):
        options["quality"] = output.quality
    version.save(buffer, format=output.format.upper(), **options)
    return buffer.getvalue(), version.width, version.height


async def save_upload(redis: Redis, upload_id: str, data: bytes) -> None:
    await redis.set(UPLOAD_KEY_PREFIX + upload_id, data, ex=UPLOAD_TTL_S)


async def _source_bytes(ctx: WorkerContext, job: ImageJob) -> bytes:
    settings = ctx.settings
    if job.upload_id is not None:
        data: bytes | None = await ctx.redis.get(UPLOAD_KEY_PREFIX + job.upload_id)
        if data is None:
            raise PermanentJobError("the uploaded image is gone (kept for a day)")
        return data
    assert job.url is not None
    return await ctx.fetcher.fetch_bytes(job.url, settings.image_max_bytes, ctx.job_id)


@builtin("process_image", "scrape", endpoint="image", shown=("url",))
async def process_image(
    ctx: WorkerContext,
    outputs: list[dict[str, Any]],
    url: str | None = None,
    upload_id: str | None = None,
) -> dict[str, Any]:
    """arq job: the image's versions, written to IMAGES_DIR/<job id>/ (files named
    <n>-<width>x<height>.<format>); returns their names, sizes and dimensions."""
    settings = ctx.settings
    job_id = ctx.job_id
    if not re.fullmatch(JOB_ID_PATTERN, job_id):  # it becomes a folder name
        raise PermanentJobError(f"image job ids are 32 hex digits, not {job_id!r}")
    job = ImageJob(url=url, upload_id=upload_id, outputs=outputs)
    data = await _source_bytes(ctx, job)
    specs = [output.model_dump() for output in job.outputs]
    versions = await ctx.cpu.run(
        "decoding and resizing the image", render_images, data, specs, settings.image_max_pixels
    )
    folder = settings.images_dir / job_id
    written = []
    for index, ((body, width, height), output) in enumerate(
        zip(versions, job.outputs, strict=True)
    ):
        name = image_name(index, width, height, output.format)
        await asyncio.to_thread(_write_atomically, folder / name, body)
        written.append(
            {"name": name, "format": output.format, "width": width, "height": height,
             "bytes": len(body)}
        )  # fmt: skip
    if job.upload_id is not None:
        await ctx.redis.delete(UPLOAD_KEY_PREFIX + job.upload_id)
    return {"outputs": written, "source_bytes": len(data)}


def _write_atomically(path: Path, body: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    with partial.open("wb") as out:
        out.write(body)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)

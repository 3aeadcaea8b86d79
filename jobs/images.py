"""Image jobs: fetch an image (through the scraper's SSRF guard and politeness) or take an
upload, and write resized versions in JPEG, PNG or WebP, downloadable like exports.

Decoding and resizing are CPU work whose cost the input decides, so they run in the worker's
CPU pool (jobs/cpulimit.py), under CPU_LIMIT_SECONDS, never in the event loop. Limits: the
image's bytes (IMAGE_MAX_BYTES for a URL, MAX_BODY_BYTES for an upload) and its pixels
(IMAGE_MAX_PIXELS, checked from the header before anything is decoded: a decompression bomb is
refused, never expanded).

An upload waits for its job in Redis (every worker on every host can read it there), charged to
its API key's held bytes (UPLOAD_MAX_BYTES_PER_KEY, asyncjobs.quota.HeldBytes), and goes with its
charge when the job ends: completed, failed for good (the dead-letter hook), or aborted while it
runs. One the job never gets to (aborted before it started, a worker gone) expires with its
charge `upload_life` after it was due or after its last try began.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal

from arq.constants import abort_jobs_ss
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator
from redis.asyncio import Redis
from redis.exceptions import RedisError

from asyncjobs.errors import PermanentJobError
from asyncjobs.keys import UPLOAD_KEY_PREFIX
from asyncjobs.quota import upload_quota
from asyncjobs.registry import Family
from asyncjobs.settings import Settings
from jobs.context import WorkerContext
from jobs.retry import builtin, job_timeout, retry_policy
from jobs.scrape.page import MAX_URL_LENGTH
from jobs.values import as_text

log = logging.getLogger(__name__)

ImageFormat = Literal["jpeg", "png", "webp"]
INPUT_FORMATS = {"JPEG", "PNG", "WEBP", "GIF"}
MAX_SIDE = 4096
MAX_OUTPUTS = 10
FAMILY: Family = "scrape"  # process_image's retry policy: SCRAPE_MAX_TRIES, RETRY_*_DELAY
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


def upload_life(settings: Settings) -> float:
    """How long an upload waits for its job's next try, in seconds: UPLOAD_TTL, and at least a
    whole try and the longest backoff after it, so that a retry still finds it."""
    longest_wait = job_timeout(settings, None) + retry_policy(settings, FAMILY).max_delay
    return max(settings.upload_ttl, longest_wait)


async def save_upload(
    redis: Redis,
    settings: Settings,
    upload_id: str,
    data: bytes,
    owner: str | None,
    delay: float = 0.0,
) -> None:
    """Keep an upload for its job, due after `delay` seconds: for that and `upload_life`.
    Charged first to `owner`'s held bytes (NeverFits, QuotaExceeded: nothing is kept); no
    owner (no API keys), no charge. If the write fails after the charge, the charge expires
    when the upload would have: the bytes kept are never more than the bytes counted."""
    life = delay + upload_life(settings)
    if owner is not None:
        await upload_quota(settings).hold(redis, owner, upload_id, len(data), life)
    key = UPLOAD_KEY_PREFIX + upload_id
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(key)  # the same request tried again (an Idempotency-Key): replaced
        pipe.hset(key, mapping={"data": data, "owner": owner or ""})
        pipe.pexpire(key, _ms(life))
        await pipe.execute()


async def read_upload(redis: Redis, settings: Settings, upload_id: str) -> bytes | None:
    """An upload's bytes for a try of its job (None: gone); it and its charge are given
    `upload_life` again from now, so that the job's retries find it."""
    key = UPLOAD_KEY_PREFIX + upload_id
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hmget(key, ["data", "owner"])
        [fields] = await pipe.execute(raise_on_error=False)
    if isinstance(fields, Exception):  # WRONGTYPE: kept by an earlier version, bytes alone
        legacy: bytes | None = await redis.get(key)
        return legacy
    data, owner = fields
    if data is None:
        return None
    life = upload_life(settings)
    if owner:  # the charge first: the bytes kept never outlive the bytes counted
        await upload_quota(settings).extend(redis, as_text(owner), upload_id, life)
    await redis.pexpire(key, _ms(life))
    return bytes(data)


async def release_upload(redis: Redis, settings: Settings, upload_id: str) -> None:
    """Remove an upload, then its charge (its job has ended)."""
    key = UPLOAD_KEY_PREFIX + upload_id
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hget(key, "owner")
        pipe.delete(key)
        owner, _ = await pipe.execute(raise_on_error=False)
    if owner and not isinstance(owner, Exception):
        await upload_quota(settings).release(redis, as_text(owner), upload_id)


async def _discard_upload(ctx: WorkerContext, upload_id: str, why: str) -> None:
    """`release_upload`, best effort: if Redis fails now, the upload and its charge expire
    with their life instead (the job's end is not worth a retry of its own)."""
    try:
        await release_upload(ctx.redis, ctx.settings, upload_id)
    except (RedisError, OSError) as exc:
        log.warning("job %s %s; its upload expires instead: %s", ctx.job_id, why, exc)


async def _drop_upload(ctx: WorkerContext, kwargs: dict[str, Any]) -> None:
    """The dead-letter hook: the job failed for good, and its upload is of no more use (a retry
    of the dead letter fails for want of it: the image is to be uploaded again)."""
    upload_id = kwargs.get("upload_id")
    if isinstance(upload_id, str):
        await _discard_upload(ctx, upload_id, "failed for good")


async def _aborted(ctx: WorkerContext) -> bool:
    """Whether this try was cancelled by an abort (`DELETE /jobs/{id}`: no try follows) rather
    than by its worker stopping (the job runs again elsewhere): an aborted job's id stays in
    arq's abort set until the job's end is written."""
    try:
        return await ctx.redis.zscore(abort_jobs_ss, ctx.job_id) is not None
    except (RedisError, OSError):
        return False  # cannot tell: keep the upload, which expires if no try comes


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


async def _source_bytes(ctx: WorkerContext, job: ImageJob) -> bytes:
    settings = ctx.settings
    if job.upload_id is not None:
        data = await read_upload(ctx.redis, settings, job.upload_id)
        if data is None:
            raise PermanentJobError(
                "the uploaded image is gone (an upload is kept for its job only, and expires "
                "when it is not run within UPLOAD_TTL)"
            )
        return data
    assert job.url is not None
    return await ctx.fetcher.fetch_bytes(job.url, settings.image_max_bytes, ctx.job_id)


@builtin("process_image", FAMILY, endpoint="image", shown=("url",), on_dead_letter=_drop_upload)
async def process_image(
    ctx: WorkerContext,
    outputs: list[dict[str, Any]],
    url: str | None = None,
    upload_id: str | None = None,
) -> dict[str, Any]:
    """arq job: the image's versions, written to IMAGES_DIR/<job id>/ (files named
    <n>-<width>x<height>.<format>); returns their names, sizes and dimensions."""
    if not re.fullmatch(JOB_ID_PATTERN, ctx.job_id):  # it becomes a folder name
        raise PermanentJobError(f"image job ids are 32 hex digits, not {ctx.job_id!r}")
    job = ImageJob(url=url, upload_id=upload_id, outputs=outputs)
    if job.upload_id is None:
        return await _render(ctx, job)
    # Its upload goes when the job ends: here when it completes or is aborted, in the
    # dead-letter hook when it fails for good; a failure that will be retried keeps it.
    try:
        result = await _render(ctx, job)
    except asyncio.CancelledError:
        if await _aborted(ctx):
            await _discard_upload(ctx, job.upload_id, "was aborted")
        raise
    await _discard_upload(ctx, job.upload_id, "completed")
    return result


async def _render(ctx: WorkerContext, job: ImageJob) -> dict[str, Any]:
    settings = ctx.settings
    job_id = ctx.job_id
    data = await _source_bytes(ctx, job)
    specs = [output.model_dump() for output in job.outputs]
    versions = await ctx.run_cpu(
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
    return {"outputs": written, "source_bytes": len(data)}


def _write_atomically(path: Path, body: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    with partial.open("wb") as out:
        out.write(body)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)

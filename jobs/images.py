"""Image jobs: fetch an image (through the scraper's SSRF guard and politeness) or take an
upload, and write resized versions in JPEG, PNG, WebP or GIF (an animation kept in the last two),
downloadable like exports.

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
from typing import Any, Literal, NamedTuple

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator, model_validator
from redis.asyncio import Redis
from redis.exceptions import RedisError

from asyncjobs.arqcompat import abort_jobs_ss
from asyncjobs.errors import PermanentJobError
from asyncjobs.keys import HEX_ID_PATTERN, UPLOAD_KEY_PREFIX
from asyncjobs.quota import upload_quota
from asyncjobs.registry import Family
from asyncjobs.settings import Settings
from jobs.context import WorkerContext
from jobs.retry import builtin, job_timeout, retry_policy
from jobs.scrape.page import MAX_URL_LENGTH
from jobs.values import as_text

log = logging.getLogger(__name__)

ImageFormat = Literal["jpeg", "png", "webp", "gif"]
INPUT_FORMATS = {"JPEG", "PNG", "WEBP", "GIF"}
TAKEN = "upload PNG, JPEG, GIF or WebP"  # said by every refusal of an input's format
ANIMATED_FORMATS = {"gif", "webp"}  # outputs that keep every frame of an animation
MAX_SIDE = 4096  # every version fits in MAX_SIDE x MAX_SIDE, the original size included
MAX_OUTPUTS = 10
DEFAULT_FRAME_MS = 100  # a frame stating no (or a zero) duration: what browsers show it for
FAMILY: Family = "scrape"  # process_image's retry policy: SCRAPE_MAX_TRIES, RETRY_*_DELAY
# No anchors, no capturing groups: it is also used inside an aiohttp route pattern.
IMAGE_NAME_PATTERN = r"[0-9]{1,2}-[0-9]{1,4}x[0-9]{1,4}\.(?:jpeg|png|webp|gif)"
CONTENT_TYPES: dict[str, str] = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
}


class ImageOutput(BaseModel):
    """One version to write: a format, and a box it must fit in (the aspect ratio is kept and
    an image is never enlarged); no box keeps the original size, up to MAX_SIDE a side."""

    model_config = ConfigDict(extra="forbid")

    format: ImageFormat
    # The cap is checked by _within_max_side, whose 422 says what it is; the schema shows it.
    width: int | None = Field(None, ge=1, json_schema_extra={"maximum": MAX_SIDE})
    height: int | None = Field(None, ge=1, json_schema_extra={"maximum": MAX_SIDE})
    quality: int = Field(85, ge=1, le=100, description="JPEG and WebP")
    background: str | None = Field(
        None,
        pattern=r"^#[0-9a-fA-F]{6}$",
        description="#rrggbb to flatten transparency onto; JPEG is always flattened (on white "
        "when not given), other formats keep transparency unless this is given",
    )

    @field_validator("width", "height")
    @classmethod
    def _within_max_side(cls, value: int | None) -> int | None:
        if value is not None and value > MAX_SIDE:
            raise ValueError(
                f"at most {MAX_SIDE} pixels: versions are made at most {MAX_SIDE}x{MAX_SIDE}"
            )
        return value


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


class Version(NamedTuple):
    """One encoded output, as render_images hands it back from the CPU pool."""

    body: bytes
    width: int
    height: int
    frames: int
    note: str | None  # said when frames of an animation were left out


class Decoded(NamedTuple):
    frames: list[Image.Image]  # every frame when an output keeps the animation, else the first
    source_frames: int  # frames in the source
    durations: list[int]  # milliseconds, one per decoded frame
    loop: int | None  # the source's loop count (0: forever); None: it plays once


def render_images(data: bytes, outputs: list[dict[str, Any]], max_pixels: int) -> list[Version]:
    """Decode once, then encode each output. Runs in a pool process; a bad or oversized image
    is a PermanentJobError."""
    specs = [ImageOutput.model_validate(spec) for spec in outputs]
    animate = any(spec.format in ANIMATED_FORMATS for spec in specs)
    decoded = _decode(data, max_pixels, animate)
    return [_encode(decoded, spec) for spec in specs]


def _decode(data: bytes, max_pixels: int, animate: bool) -> Decoded:
    """The first frame, or every frame when `animate`; refused from the header when that is
    more than `max_pixels` in all (a small GIF can declare thousands of full-canvas frames)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(io.BytesIO(data))
            if opened.format not in INPUT_FORMATS:
                raise PermanentJobError(f"{opened.format} is not supported: {TAKEN}")
            count: int = getattr(opened, "n_frames", 1)  # frame headers only: nothing decoded
            keep = count if animate else 1
            _check_pixels(opened.width, opened.height, keep, max_pixels)
            return _frames(opened, count, keep)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            # Pillow's own check, from the header (over twice the limit it refuses to open)
            raise PermanentJobError(too_many_pixels(*_header_size(data), max_pixels)) from None
        except UnidentifiedImageError:  # its message is a repr of our buffer: say what it is
            raise PermanentJobError(_unidentified(data)) from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt
            raise PermanentJobError(f"the image could not be decoded: {exc}") from None


def _check_pixels(width: int, height: int, frames: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise PermanentJobError(too_many_pixels(width, height, max_pixels))
    if width * height * frames > max_pixels:
        raise PermanentJobError(
            f"{frames} frames of {width}x{height} are more than {max_pixels:,} pixels "
            "(IMAGE_MAX_PIXELS counts every frame of an animation): not decoded"
        )


def _frames(opened: Image.Image, count: int, keep: int) -> Decoded:
    """The first `keep` frames, each whole (Pillow draws a GIF's frame over the ones before)
    and upright as a camera held it (EXIF orientation applied, then dropped)."""
    frames, durations = [], []
    for index in range(keep):
        opened.seek(index)
        frames.append(ImageOps.exif_transpose(opened))  # loads the frame: its info is current
        durations.append(int(opened.info.get("duration") or DEFAULT_FRAME_MS))
    loop = opened.info.get("loop")
    return Decoded(frames, count, durations, int(loop) if loop is not None else None)


def _unidentified(data: bytes) -> str:
    """Why bytes Pillow cannot identify are refused; SVG, the usual one, by name."""
    head = data[:65536].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<") and b"<svg" in head:
        return f"SVG is not supported: {TAKEN}"
    return f"not an image this job can read: {TAKEN}"


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


def _encode(decoded: Decoded, output: ImageOutput) -> Version:
    animated = output.format in ANIMATED_FORMATS and len(decoded.frames) > 1
    versions = [_prepare(frame, output) for frame in decoded.frames[: None if animated else 1]]
    first = versions[0]
    buffer = io.BytesIO()
    first.save(buffer, format=output.format.upper(), **_save_options(output, versions, decoded))
    note = None
    if decoded.source_frames > 1 and not animated:
        note = (
            f"only the first of {decoded.source_frames} frames was used: {output.format.upper()} "
            "versions are not animated (ask for gif or webp to keep the animation)"
        )
    return Version(buffer.getvalue(), first.width, first.height, len(versions), note)


def _prepare(frame: Image.Image, output: ImageOutput) -> Image.Image:
    """One frame in a mode the format writes, flattened if asked (JPEG: always), resized."""
    background = output.background or ("#ffffff" if output.format == "jpeg" else None)
    if _transparent(frame):
        version = frame.convert("RGBA") if background is None else _flatten(frame, background)
    elif frame.mode in ("RGB", "L"):
        version = frame.copy()  # thumbnail() works in place: the decoded frame is shared
    else:
        version = frame.convert("RGB")  # P, CMYK, I;16...: what every output format writes
    version.thumbnail((output.width or MAX_SIDE, output.height or MAX_SIDE))
    return version


def _transparent(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _flatten(frame: Image.Image, colour: str) -> Image.Image:
    """`frame` drawn over a plain `colour`. Dropping alpha instead would show whatever the
    transparent pixels happen to store: usually black."""
    canvas = Image.new("RGBA", frame.size, colour)
    canvas.alpha_composite(frame.convert("RGBA"))
    return canvas.convert("RGB")


def _save_options(
    output: ImageOutput, versions: list[Image.Image], decoded: Decoded
) -> dict[str, Any]:
    options: dict[str, Any] = {"optimize": True}
    if output.format in ("jpeg", "webp"):
        options["quality"] = output.quality
    if len(versions) == 1:
        return options
    options |= {
        "save_all": True,
        "append_images": versions[1:],
        "duration": decoded.durations[: len(versions)],
    }
    if decoded.loop is not None:
        options["loop"] = decoded.loop
    elif output.format == "webp":
        options["loop"] = 1  # WebP loops forever unless told; the source plays once
    if output.format == "gif":
        options["disposal"] = 2  # frames are whole: clear each, or transparent parts show the last
    elif any(_transparent(version) for version in versions):
        # libwebp's sub-frame optimisation can leave the file's alpha flag unset, and readers
        # (Pillow) then show transparent parts black; every frame a key frame keeps it
        options["kmax"] = 1
    return options


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
    if not re.fullmatch(HEX_ID_PATTERN, ctx.job_id):  # it becomes a folder name
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
    for index, (version, output) in enumerate(zip(versions, job.outputs, strict=True)):
        name = image_name(index, version.width, version.height, output.format)
        await asyncio.to_thread(_write_atomically, folder / name, version.body)
        entry: dict[str, Any] = {
            "name": name,
            "format": output.format,
            "width": version.width,
            "height": version.height,
            "bytes": len(version.body),
            "frames": version.frames,
        }
        if version.note is not None:
            entry["note"] = version.note
        written.append(entry)
    return {"outputs": written, "source_bytes": len(data)}


def _write_atomically(path: Path, body: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    with partial.open("wb") as out:
        out.write(body)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)

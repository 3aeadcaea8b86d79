"""Image jobs: `POST /jobs/image` with an image URL (JSON) or an upload (multipart), then the
versions the worker wrote, downloaded from `/images/<job id>/<name>`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from app.auth import PRINCIPAL, quota_refusals
from app.http import enqueue, json_model, status_url
from app.idempotency import idempotent, new_job_id
from app.joboptions import JobOptions, read_job_request
from app.schemas import JobAccepted
from app.state import REDIS, SETTINGS
from asyncjobs.keys import HEX_ID_PATTERN
from jobs.engine.unique import is_existing
from jobs.images import (
    CONTENT_TYPES,
    IMAGE_NAME_PATTERN,
    ImageSpec,
    ImageUploadSpec,
    release_upload,
    save_upload,
)

UPLOAD_FIELDS = ("image", "outputs", "options")


class ImageAccepted(JobAccepted):
    images_url: str  # the versions appear under it as the result lists them


@idempotent
async def enqueue_image(request: web.Request) -> web.Response:
    job_id = new_job_id(request)  # also the folder of its versions
    if request.content_type == "multipart/form-data":
        options, kwargs = await _upload(request, job_id)
    else:
        options, body = await read_job_request(request)
        spec = ImageSpec.model_validate(body)
        if spec.url is None:
            raise web.HTTPUnprocessableEntity(
                text="give the image's 'url', or upload it as multipart/form-data"
            )
        outputs = [o.model_dump() for o in spec.outputs]
        kwargs = {"url": str(spec.url), "outputs": outputs}
    try:
        enqueued = await enqueue(
            request, "process_image", _job_id=job_id, **kwargs, **options.enqueue_kwargs()
        )
    except web.HTTPException as exc:
        if "upload_id" in kwargs and exc.status < 500:  # refused: no job will read the upload
            await release_upload(request.app[REDIS], request.app[SETTINGS], kwargs["upload_id"])
        raise  # an unknown outcome keeps it: the job may be there; if not, it expires
    if is_existing(enqueued) and "upload_id" in kwargs:  # the unique key's job: not this one
        await release_upload(request.app[REDIS], request.app[SETTINGS], kwargs["upload_id"])
    accepted = ImageAccepted(
        job_id=enqueued,
        status_url=status_url(request, enqueued),
        images_url=f"/images/{enqueued}/",
        existing=is_existing(enqueued),
    )
    return json_model(accepted, status=202)


async def _upload(request: web.Request, job_id: str) -> tuple[JobOptions, dict[str, Any]]:
    """Parts: `image` (the file, at most MAX_BODY_BYTES with the rest), and optionally
    `outputs` (a JSON list) and `options` (a JSON object of job options). The image is kept
    in Redis for its job, charged to the API key's held bytes (UPLOAD_MAX_BYTES_PER_KEY):
    422 if it is larger than all of them, 429 while the key's other uploads leave no room."""
    settings = request.app[SETTINGS]
    parts = await _read_parts(request)
    image = parts.get("image")
    if not image:
        raise web.HTTPUnprocessableEntity(text="the upload has no 'image' part")
    spec = ImageUploadSpec.model_validate(_json_part(parts, "outputs", {}, "outputs"))
    options = JobOptions.model_validate(
        _json_part(parts, "options", {}, None), context={"settings": settings}
    )
    upload_id = job_id
    principal = request.get(PRINCIPAL)
    owner = principal.key_id if principal is not None else None
    delay = options.delay_ms() / 1000
    with quota_refusals():
        await save_upload(request.app[REDIS], settings, upload_id, image, owner, delay)
    return options, {"upload_id": upload_id, "outputs": [o.model_dump() for o in spec.outputs]}


async def _read_parts(request: web.Request) -> dict[str, bytes]:
    parts: dict[str, bytes] = {}
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name not in UPLOAD_FIELDS:
                name = getattr(part, "name", None)
                raise web.HTTPUnprocessableEntity(
                    text=f"unknown part {name!r}: the parts are {', '.join(UPLOAD_FIELDS)}"
                )
            parts[part.name] = bytes(await part.read())  # the body is capped by MAX_BODY_BYTES
    except (HttpProcessingError, ValueError) as exc:  # what aiohttp's parser raises
        raise web.HTTPBadRequest(text=f"malformed multipart body: {exc}") from None
    return parts


def _json_part(parts: dict[str, bytes], name: str, default: Any, wrap: str | None) -> Any:
    if name not in parts:
        return default
    try:
        value = json.loads(parts[name])
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"part {name!r} is not valid JSON: {exc}") from exc
    return {wrap: value} if wrap else value


async def download_image(request: web.Request) -> web.StreamResponse:
    job_id, name = request.match_info["job_id"], request.match_info["name"]
    path = request.app[SETTINGS].images_dir / job_id / name  # the patterns allow no separators
    if not await asyncio.to_thread(path.is_file):
        raise web.HTTPNotFound(text=f"no image {job_id}/{name}: not written, expired or never")
    headers = {"Content-Type": CONTENT_TYPES[name.rpartition(".")[2]]}
    return web.FileResponse(path, headers=headers)


def add_image_routes(app: web.Application) -> None:
    app.router.add_post("/jobs/image", enqueue_image)
    app.router.add_get(
        f"/images/{{job_id:{HEX_ID_PATTERN}}}/{{name:{IMAGE_NAME_PATTERN}}}", download_image
    )

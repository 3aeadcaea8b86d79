"""The OpenAPI 3.1 document, generated from the same pydantic models that validate requests and
shape responses. The table below says which model goes where; the schemas are never written
by hand."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from app.http import JOB_ID_PATTERN
from app.joboptions import JobOptions
from app.mailsink import MESSAGE_NAME_PATTERN
from app.routes.images import ImageAccepted
from app.routes.registered import JobTypeList, endpoint_of
from app.schemas import (
    AbortAccepted,
    BatchAccepted,
    BatchRequest,
    DeadLetterPage,
    DocumentDetail,
    DocumentList,
    EmailAccepted,
    EmailSpec,
    ErrorBody,
    Health,
    JobAccepted,
    JobNotFound,
    JobView,
    MailList,
    NewsletterAccepted,
    NewsletterRequest,
    RunList,
    ScheduleList,
    ScheduleRunAccepted,
    ScrapeAcceptedAny,
    ScrapeBatch,
    ScrapeRequest,
    SourceList,
    SourceRunAccepted,
    SourceRunList,
    SourceRunRequest,
)
from app.state import SETTINGS
from asyncjobs import __version__
from asyncjobs.keys import HEX_ID_PATTERN
from asyncjobs.registry import user_job_types
from jobs.deadletter import DeadLetter
from jobs.housekeeping.export import CONTENT_TYPES, EXPORT_NAME_PATTERN, ExportRequest
from jobs.http.spec import HttpAnswer, HttpCall
from jobs.images import CONTENT_TYPES as IMAGE_CONTENT_TYPES
from jobs.images import IMAGE_NAME_PATTERN, ImageSpec
from jobs.schedules import ScheduleFields, ScheduleSpec, ScheduleView
from jobs.scrape.sources import Source, SourceFields, SourceSpec

JSON = "application/json"
ERRORS = {
    400: "Malformed request (empty body, invalid JSON, bad query parameter)",
    401: "Missing or wrong API key",
    403: "The API key may not do this (read-only)",
    404: "No such resource",
    413: "Request body too large",
    422: "The request is invalid; `details` names each field and problem",
    429: "Rate limit reached; see Retry-After",
    503: "The job broker (Redis) is unavailable",
}
PAGING = [
    ("offset", {"type": "integer", "minimum": 0}),
    ("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
]
ID32 = f"^{HEX_ID_PATTERN}$"
IMAGE_UPLOAD = {
    "schema": {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {"type": "string", "format": "binary"},
            "outputs": {"type": "string", "description": "JSON list of outputs"},
            "options": {"type": "string", "description": "JSON object of job options"},
        },
    }
}
JOB_ID = f"^{JOB_ID_PATTERN}$"


@dataclass
class Operation:
    method: str
    path: str
    summary: str
    ok: int
    response: type[BaseModel] | None = None  # None: no body (204) or a file (`content`)
    body: type[BaseModel] | None = None
    path_params: dict[str, str] = field(default_factory=dict)  # name -> regex
    query: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    content: dict[str, Any] | None = None  # a non-JSON success body
    public: bool = False
    extra: dict[int, tuple[str, type[BaseModel]]] = field(default_factory=dict)
    operation_id: str | None = None  # default: from the method and the path
    result: dict[str, Any] | None = None  # a job's result schema, as GET /jobs/{id} shows it

    def operation_name(self) -> str:
        if self.operation_id:
            return self.operation_id
        words = [part.strip("{}") for part in self.path.split("/") if part]
        return "_".join([self.method, *words]).replace("-", "_").replace(".", "_")

    def tag(self) -> str:
        return self.path.split("/")[1]


OPERATIONS = [
    Operation("post", "/jobs/email", "Send an email", 202, EmailAccepted, EmailSpec),
    Operation("post", "/jobs/newsletter", "Send one templated email per recipient", 202,
              NewsletterAccepted, NewsletterRequest),
    Operation("post", "/jobs/scrape", "Scrape one URL (`url`) or several (`urls`: one job each)",
              202, ScrapeAcceptedAny, ScrapeRequest),
    Operation("post", "/jobs/export", "Export documents to CSV or JSON Lines", 202, JobAccepted,
              ExportRequest),
    Operation("post", "/jobs/image", "Resize an image (its `url`, or a multipart upload) into "
              "JPEG, PNG, WebP or GIF versions", 202, ImageAccepted, ImageSpec),
    Operation("get", "/images/{job_id}/{name}", "Download a version an image job wrote", 200,
              path_params={"job_id": ID32, "name": f"^{IMAGE_NAME_PATTERN}$"},
              content={ctype: {"schema": {"type": "string"}}
                       for ctype in IMAGE_CONTENT_TYPES.values()}),
    Operation("post", "/jobs/report", "Compute the analysis report now", 202, JobAccepted,
              JobOptions),
    Operation("post", "/jobs/http", "Call a URL, signed, until it answers a success status "
              "(retried, limited per target)", 202, JobAccepted, HttpCall,
              result=HttpAnswer.model_json_schema()),
    Operation("post", "/batches", "Several jobs at once, with one callback when all have ended",
              202, BatchAccepted, BatchRequest),
    Operation("get", "/batches/{batch_id}", "Progress of a multi-URL scrape: each job's status",
              200, ScrapeBatch, path_params={"batch_id": ID32}),
    Operation("get", "/jobs/types", "Every job type: arguments, result, retries, priority, cost",
              200, JobTypeList),
    Operation("get", "/jobs/{job_id}", "A job's status, times, tries, result or error", 200,
              JobView, path_params={"job_id": JOB_ID},
              extra={404: ("No such job (status not_found)", JobNotFound)}),
    Operation("delete", "/jobs/{job_id}", "Abort a queued, deferred or running job", 202,
              AbortAccepted, path_params={"job_id": JOB_ID},
              extra={409: ("The job has already finished", ErrorBody)}),
    Operation("get", "/dead-letter", "Jobs that failed for good, newest first", 200,
              DeadLetterPage, query=PAGING),
    Operation("get", "/dead-letter/{entry_id}", "One dead-letter entry", 200, DeadLetter,
              path_params={"entry_id": JOB_ID}),
    Operation("post", "/dead-letter/{entry_id}/retry", "Enqueue again with a fresh try budget",
              202, JobAccepted, path_params={"entry_id": JOB_ID}),
    Operation("delete", "/dead-letter/{entry_id}", "Forget a dead-letter entry", 204,
              path_params={"entry_id": JOB_ID}),
    Operation("post", "/sources", "Add a source scraped on a schedule", 201, Source, SourceSpec),
    Operation("get", "/sources", "All sources", 200, SourceList),
    Operation("get", "/sources/{source_id}", "One source", 200, Source,
              path_params={"source_id": ID32}),
    Operation("patch", "/sources/{source_id}", "Change a source", 200, Source, SourceFields,
              path_params={"source_id": ID32}),
    Operation("delete", "/sources/{source_id}", "Delete a source", 204,
              path_params={"source_id": ID32}),
    Operation("post", "/sources/{source_id}/run", "Run a source now", 202, SourceRunAccepted,
              SourceRunRequest, path_params={"source_id": ID32},
              extra={409: ("A run of the source is in progress", ErrorBody)}),
    Operation("get", "/sources/{source_id}/runs", "The source's last runs, newest first", 200,
              SourceRunList, path_params={"source_id": ID32}),
    Operation("post", "/schedules", "Run a job on a cron expression or every N seconds", 201,
              ScheduleView, ScheduleSpec),
    Operation("get", "/schedules", "All schedules, with their next runs", 200, ScheduleList),
    Operation("get", "/schedules/{schedule_id}", "One schedule", 200, ScheduleView,
              path_params={"schedule_id": ID32}),
    Operation("patch", "/schedules/{schedule_id}", "Change a schedule", 200, ScheduleView,
              ScheduleFields, path_params={"schedule_id": ID32}),
    Operation("delete", "/schedules/{schedule_id}", "Delete a schedule", 204,
              path_params={"schedule_id": ID32}),
    Operation("post", "/schedules/{schedule_id}/pause", "Pause a schedule", 200, ScheduleView,
              path_params={"schedule_id": ID32}),
    Operation("post", "/schedules/{schedule_id}/resume", "Resume a schedule", 200, ScheduleView,
              path_params={"schedule_id": ID32}),
    Operation("get", "/schedules/{schedule_id}/runs", "The last runs and their jobs' status",
              200, RunList, path_params={"schedule_id": ID32}),
    Operation("post", "/schedules/{schedule_id}/run", "Run a schedule now, besides its periods "
              "(charged to its owner's message quota; kept in its runs as manual)", 202,
              ScheduleRunAccepted, path_params={"schedule_id": ID32}),
    Operation("get", "/documents", "Saved documents, newest change first", 200, DocumentList,
              query=[("source", {"type": "string", "pattern": ID32}),
                     ("changed_since", {"type": "string", "format": "date-time"}), *PAGING]),
    Operation("get", "/documents/{doc_id}", "A document and its versions", 200, DocumentDetail,
              path_params={"doc_id": ID32}),
    Operation("get", "/exports/{name}", "Download an export file", 200,
              path_params={"name": f"^{EXPORT_NAME_PATTERN}$"},
              content={ctype.split(";")[0]: {"schema": {"type": "string"}}
                       for ctype in CONTENT_TYPES.values()}),
    Operation("get", "/reports/latest", "The latest analysis report", 200,
              content={JSON: {"schema": {"type": "object"}}}),
    Operation("get", "/reports/latest.html", "The latest analysis report as a page", 200,
              content={"text/html": {"schema": {"type": "string"}}}),
    Operation("get", "/metrics", "Prometheus metrics: jobs by outcome and function, durations, "
              "pickup latency, queue depth, workers, emails, pages, HTTP requests", 200,
              content={"text/plain": {"schema": {"type": "string"}}}),
    Operation("get", "/health", "Redis reachable, worker heartbeat, version", 200, Health,
              public=True, extra={503: ("Redis is unreachable", Health)}),
]  # fmt: skip

DEV_OPERATIONS = [
    Operation("get", "/dev/mail", "Dev mail sink: messages received", 200, MailList,
              query=[("limit", {"type": "integer", "minimum": 1, "maximum": 500})]),
    Operation("get", "/dev/mail/{name}", "Dev mail sink: one raw message", 200,
              path_params={"name": f"^{MESSAGE_NAME_PATTERN}$"},
              content={"message/rfc822": {"schema": {"type": "string"}}}),
]  # fmt: skip


def user_job_operations() -> list[Operation]:
    """One enqueue operation per user's job type in the registry, with its own body."""
    return [
        Operation("post", endpoint, job_type.summary or f"Enqueue {job_type.name}", 202,
                  JobAccepted, job_type.arguments, operation_id=f"enqueue_{job_type.name}",
                  result=job_type.result_schema() or None)
        for job_type in user_job_types()
        if job_type.arguments is not None and (endpoint := endpoint_of(job_type))
    ]  # fmt: skip


def build_openapi(dev_mail: bool = False) -> dict[str, Any]:
    operations = OPERATIONS + user_job_operations() + (DEV_OPERATIONS if dev_mail else [])
    schemas, refs = _component_schemas(operations)
    _add_job_options(operations, schemas, refs)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method] = _operation(op, refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": "asyncjobs", "version": __version__,
                 "description": "Background jobs over arq and Redis: email, scraping, exports."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }  # fmt: skip


def _component_schemas(
    operations: list[Operation],
) -> tuple[dict[str, Any], dict[tuple[type[BaseModel], str], Any]]:
    """Every model once, as components; request bodies in validation mode, responses in
    serialization mode (they differ where aliases or defaults do)."""
    wanted: set[tuple[type[BaseModel], JsonSchemaMode]] = {(ErrorBody, "serialization")}
    for op in operations:
        if op.body:
            wanted.add((op.body, "validation"))
        for model in [op.response, *(m for _, m in op.extra.values())]:
            if model:
                wanted.add((model, "serialization"))
    ordered = sorted(wanted, key=lambda pair: (pair[0].__name__, pair[1]))
    refs, top = models_json_schema(ordered, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = top.get("$defs", {})
    return schemas, dict(refs)  # type: ignore[arg-type]


def _is_enqueue(op: Operation) -> bool:
    return op.method == "post" and op.path.startswith("/jobs/")


def _add_job_options(
    operations: list[Operation],
    schemas: dict[str, Any],
    refs: dict[tuple[type[BaseModel], str], Any],
) -> None:
    """Every enqueue body also takes the job options (run_at, delay_seconds, priority,
    callback_url): merged into a schema of its own, since both sides forbid other fields."""
    options = schemas[_ref_name(refs[(JobOptions, "validation")])]
    for op in operations:
        if not _is_enqueue(op) or op.body is None or op.body is JobOptions:
            continue
        name = _ref_name(refs[(op.body, "validation")])
        merged = copy.deepcopy(schemas[name])
        merged["properties"] = {**merged.get("properties", {}), **options["properties"]}
        merged["title"] = f"{merged.get('title', name)} with job options"
        schemas[f"{name}WithOptions"] = merged
        refs[(op.body, "enqueue")] = {"$ref": f"#/components/schemas/{name}WithOptions"}


def _ref_name(ref: dict[str, str]) -> str:
    return ref["$ref"].rsplit("/", 1)[1]


def _operation(op: Operation, refs: dict[tuple[type[BaseModel], str], Any]) -> dict[str, Any]:
    def body(model: type[BaseModel], mode: str = "serialization") -> dict[str, Any]:
        return {JSON: {"schema": refs[(model, mode)]}}

    error = body(ErrorBody)
    responses: dict[str, Any] = {}
    if op.response is not None:
        responses[str(op.ok)] = {"description": "OK", "content": body(op.response)}
    elif op.content is not None:
        responses[str(op.ok)] = {"description": "OK", "content": op.content}
    else:
        responses[str(op.ok)] = {"description": "Done, no body"}
    for status, (description, model) in op.extra.items():
        responses[str(status)] = {"description": description, "content": body(model)}
    for status, description in ERRORS.items():
        if op.public and status in (401, 403, 429):
            continue
        responses.setdefault(str(status), {"description": description, "content": error})
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": rx}}
        for name, rx in op.path_params.items()
    ]
    parameters += [{"name": n, "in": "query", "required": False, "schema": s} for n, s in op.query]
    if _is_enqueue(op):
        parameters.append({
            "name": "Idempotency-Key", "in": "header", "required": False,
            "description": "Repeat-safe enqueue: the same key returns the first answer",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
        })  # fmt: skip
    operation: dict[str, Any] = {
        "summary": op.summary,
        "operationId": op.operation_name(),
        "tags": [op.tag()],
        "responses": responses,
    }
    if op.result is not None:  # what GET /jobs/{id} shows as `result` once it is complete
        operation["x-job-result"] = op.result
    if parameters:
        operation["parameters"] = parameters
    if op.body is JobOptions:  # a job with nothing to say but its options: body optional
        operation["requestBody"] = {"required": False, "content": body(op.body, "validation")}
    elif op.body is not None:
        mode = "enqueue" if (op.body, "enqueue") in refs else "validation"
        operation["requestBody"] = {"required": True, "content": body(op.body, mode)}
        if op.path == "/jobs/image":
            operation["requestBody"]["content"]["multipart/form-data"] = IMAGE_UPLOAD
    if op.public:
        operation["security"] = []
    return operation


async def openapi_document(request: web.Request) -> web.Response:
    dev_mail = request.app[SETTINGS].mail_sink_dir is not None
    return web.json_response(build_openapi(dev_mail))

"""/openapi.json covers every route the app serves, with its errors, from the pydantic models."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.web import create_app
from asyncjobs.settings import Settings
from tests.helpers import ApiClient, api_client


def served_routes(settings: Settings) -> set[tuple[str, str]]:
    app = create_app(settings)
    routes = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        path = re.sub(r"\{(\w+)(?::[^}]*)?\}", r"{\1}", path)  # drop the regexes
        if route.method != "HEAD" and not path.startswith("/ui"):  # the dashboard is HTML
            routes.add((route.method.lower(), path))
    return routes


async def test_every_route_is_documented(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(mail_sink_dir=tmp_path)
    async with api_client(create_app(settings)) as client:
        spec: dict[str, Any] = await (await client.get("/openapi.json")).json()
    documented = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    not_api = {("get", "/openapi.json"), ("get", "/favicon.ico")}  # the document; the icon
    assert documented == served_routes(settings) - not_api
    assert spec["openapi"].startswith("3.1")
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            public = path == "/health"
            assert ("401" in responses) is not public, (method, path)
            assert "422" in responses and "503" in responses, (method, path)
            assert responses["422"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"
            }


async def test_request_schemas_come_from_the_models(api: ApiClient) -> None:
    spec: dict[str, Any] = await (await api.get("/openapi.json")).json()
    email_body = spec["paths"]["/jobs/email"]["post"]["requestBody"]["content"]
    ref = email_body["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    email = spec["components"]["schemas"][ref]
    assert {"to", "subject", "text", "html", "from", "reply_to", "headers"} <= set(
        email["properties"]
    )
    assert set(email["required"]) == {"to", "subject"}
    assert email["additionalProperties"] is False


async def test_head_of_the_public_documents_needs_no_key(settings: Settings) -> None:
    """HEAD is answered as GET is: /openapi.json and /health are public for both."""
    async with api_client(create_app(settings)) as client:
        client.session.headers.pop("Authorization", None)
        statuses = {
            (method, path): (await client.request(method, path)).status
            for method in ("GET", "HEAD")
            for path in ("/openapi.json", "/health")
        }
        locked = (await client.request("HEAD", "/jobs/types")).status
    assert set(statuses.values()) == {200}, statuses
    assert locked == 401

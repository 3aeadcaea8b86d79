"""Bad input gets a 4xx with a JSON body naming the field and the problem; never a 500."""

from __future__ import annotations

from typing import Any

import pytest
from arq.connections import ArqRedis

from tests.helpers import ApiClient

GOOD_EMAIL = {"to": "a@example.com", "subject": "Hi", "text": "Hello"}


def email(**changes: Any) -> dict[str, Any]:
    body = dict(GOOD_EMAIL) | changes
    return {k: v for k, v in body.items() if v is not None}


async def assert_error(
    response: Any, status: int, field: str | None = None, text: str = ""
) -> None:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error", "message", "details"}
    if field is not None:
        fields = {d["field"]: d["message"] for d in body["details"]}
        assert field in fields, body
        assert text.lower() in fields[field].lower(), body
    else:
        assert text.lower() in body["message"].lower(), body


@pytest.mark.parametrize(
    ("body", "field", "text"),
    [
        (email(to=None), "to", "field required"),
        (email(to="not-an-address"), "to.0", "valid email"),
        (email(to=[]), "to", "at least 1"),
        (email(cc=["x@"]), "cc.0", "valid email"),
        (email(subject=None), "subject", "field required"),
        (email(subject=""), "subject", "at least 1 character"),
        (email(subject="Hi\r\nBcc: victim@example.com"), "subject", "single line"),
        (email(text=None), "body", "give 'text', 'html' or both"),
        (email(reply_to="a@b\nc"), "reply_to", "valid email"),
        (email(**{"from": "nobody"}), "from", "valid email"),
        (email(headers={"X-Ok": "a\nInjected: yes"}), "headers.X-Ok", "single line"),
        (email(headers={"Bcc": "victim@example.com"}), "headers", "'Bcc' is not allowed"),
        (email(headers={"DKIM-Signature": "v=1"}), "headers", "use X-* or one of"),
        (email(headers={"Authentication-Results": "pass"}), "headers", "not allowed"),
        (email(headers={"Delivered-To": "x@example.com"}), "headers", "not allowed"),
        (email(headers={"Resent-Sender": "x@example.com"}), "headers", "not allowed"),
        (email(headers={"Content-ID": "<x>"}), "headers", "not allowed"),
        (email(headers={"Bad Name": "v"}), "headers", "invalid header name"),
        (email(to=[f"u{i}@example.com" for i in range(51)]), "body", "more than the limit of 50"),
        (email(unknown="x"), "unknown", "extra inputs"),
        (email(text=123), "text", "valid string"),
    ],
)
async def test_bad_email_requests(
    api: ApiClient, redis: ArqRedis, body: dict[str, Any], field: str, text: str
) -> None:
    await assert_error(await api.post("/jobs/email", json=body), 422, field, text)
    assert await redis.zcard("arq:queue") == 0  # nothing was enqueued


@pytest.mark.parametrize(
    ("body", "field", "text"),
    [
        ({}, "body", "exactly one of 'url' or 'urls'"),
        ({"url": "http://a.example/", "urls": ["http://b.example/"]}, "body", "exactly one"),
        ({"url": "ftp://example.com/"}, "url", "scheme should be 'http' or 'https'"),
        ({"url": "javascript:alert(1)"}, "url", "scheme"),
        ({"url": "not a url"}, "url", "valid url"),
        ({"urls": []}, "urls", "at least 1"),
        ({"urls": ["http://ok.example/", "file:///etc/passwd"]}, "urls.1", "scheme"),
        ({"url": "http://a.example/", "selectors": {"x": "p[["}}, "selectors", "not a valid CSS"),
        ({"url": "http://a.example/", "selectors": {"": "p"}}, "selectors", "1 to 64"),
        ({"urls": [f"http://h{i}.example/" for i in range(101)]}, "body", "limit of 100"),
        ({"url": "http://a.example/" + "x" * 3000}, "url", "at most 2048"),
    ],
)
async def test_bad_scrape_requests(
    api: ApiClient, redis: ArqRedis, body: dict[str, Any], field: str, text: str
) -> None:
    await assert_error(await api.post("/jobs/scrape", json=body), 422, field, text)
    assert await redis.zcard("arq:queue") == 0


@pytest.mark.parametrize("path", ["/jobs/email", "/jobs/scrape"])
@pytest.mark.parametrize(
    ("raw", "status", "text"),
    [
        (b"", 400, "empty"),
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"[1, 2]", 422, "must be a JSON object"),
        (b'"text"', 422, "must be a JSON object"),
    ],
)
async def test_malformed_bodies(
    api: ApiClient, path: str, raw: bytes, status: int, text: str
) -> None:
    response = await api.post(path, data=raw, headers={"Content-Type": "application/json"})
    await assert_error(response, status, text=text)


async def test_oversized_body_is_413(api: ApiClient) -> None:
    huge = {**GOOD_EMAIL, "text": "x" * (1024 * 1024 + 10)}
    await assert_error(
        await api.post("/jobs/email", json=huge), 413, text="maximum request body size"
    )


async def test_unknown_route_and_method_are_json(api: ApiClient) -> None:
    await assert_error(await api.get("/nope"), 404)
    await assert_error(await api.put("/jobs/email", json={}), 405)


async def test_unknown_job_is_404_not_found(api: ApiClient) -> None:
    response = await api.get("/jobs/0123456789abcdef")
    assert response.status == 404
    assert (await response.json())["status"] == "not_found"


async def test_scrape_batch_enqueues_one_job_per_url(api: ApiClient, redis: ArqRedis) -> None:
    urls = ["http://a.example/", "http://b.example/x"]
    response = await api.post("/jobs/scrape", json={"urls": urls})
    assert response.status == 202
    jobs = (await response.json())["jobs"]
    assert [j["url"] for j in jobs] == urls
    assert await redis.zcard("arq:queue") == 2
    statuses = [(await (await api.get(j["status_url"])).json())["status"] for j in jobs]
    assert statuses == ["queued", "queued"]
    batch = await (await api.get((await response.json())["batch_url"])).json()
    assert (batch["total"], batch["finished"], batch["by_status"]) == (2, 0, {"queued": 2})
    listed = [(j["job_id"], j["url"]) for j in batch["jobs"]]
    assert listed == [(j["job_id"], j["url"]) for j in jobs]


async def test_unknown_batch_is_404(api: ApiClient) -> None:
    response = await api.get("/batches/" + "0" * 32)
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "raw", "text"),
    [
        ("POST", "/jobs/email", b"[" * 100_000, "nests deeper than 32 levels"),
        ("POST", "/jobs/email", b'{"to": ' + b"[" * 40 + b"]" * 40 + b"}", "nests deeper"),
        ("POST", "/sources", b'{"url": "http://example.com/", "schedule": "daily", '
         b'"max_pages": ' + b"9" * 5000 + b"}", "not valid JSON"),
        ("GET", "/documents?limit=%C2%B2", None, "must be an integer"),
        ("GET", "/documents?limit=" + "9" * 5000, None, "must be an integer"),
    ],
)  # fmt: skip
async def test_hostile_inputs_are_a_400_not_a_500(
    api: ApiClient, method: str, path: str, raw: bytes | None, text: str
) -> None:
    """Found by an attacker with a key: each of these was a 500 with a stack trace."""
    headers = {"Content-Type": "application/json"}
    response = await api.request(method, path, data=raw, headers=headers)
    await assert_error(response, 400, text=text)

"""Schemathesis against the real API process: thousands of generated requests, no 5xx, and every
response as the OpenAPI document says (status codes, content types, bodies, headers)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import ClientSession
from arq.connections import ArqRedis

from tests.conftest import API_KEY, READ_KEY, TEST_REDIS_URL
from tests.faults.procs import service_env, stop_process
from tests.helpers import free_port, wait_for

FUZZ_TIMEOUT_S = 300
ACCESS_STATUS = re.compile(r'HTTP/1\.1" (\d{3}) ')  # aiohttp's access log line
CHECKS_SKIPPED = {
    # Business rules beyond JSON Schema (text or html, one of url/urls, templates that compile,
    # valid CSS selectors...) make schema-valid bodies 422 and some invalid ones look fine.
    "positive_data_acceptance": "rules beyond JSON Schema",
    "negative_data_rejection": "rules beyond JSON Schema",
    # DELETE /jobs/{id} aborts a job; the job stays visible (as aborted), by design.
    "use_after_free": "DELETE on a job means abort",
}


# Inputs schemathesis does not generate and an attacker with a key found (each was a 500):
# nesting past the parser's recursion limit, a 5,000-digit number, a Unicode digit in a query.
HOSTILE_INPUTS = [
    ("POST", "/jobs/email", b"[" * 100_000),
    ("POST", "/sources", b'{"url": "http://example.com/", "schedule": "daily", "max_pages": '
     + b"9" * 5000 + b"}"),
    ("GET", "/documents?limit=%C2%B2", None),
]  # fmt: skip


async def send_hostile_inputs(base: str) -> list[int]:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    statuses = []
    async with ClientSession(headers=headers) as http:
        for method, path, body in HOSTILE_INPUTS:
            async with http.request(method, base + path, data=body) as response:
                statuses.append(response.status)
    return statuses


@pytest.mark.timeout(FUZZ_TIMEOUT_S + 60)  # past its own deadline (the global one is 120 s)
@pytest.mark.slow
async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    redis: ArqRedis, tmp_path: Path, fault_report: Callable[[str], None]
) -> None:
    port = free_port()
    env = service_env(
        redis_url=TEST_REDIS_URL, web_port=port, api_keys=API_KEY, api_read_keys=READ_KEY,
        rate_limit_requests=1_000_000, mail_sink_dir=tmp_path / "mail",
        exports_dir=tmp_path / "exports", log_level="INFO",  # INFO: the access log
    )  # fmt: skip
    log = (tmp_path / "web.log").open("wb")
    web = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "web", cwd=tmp_path, env=env, stdout=log, stderr=log
    )
    try:
        base = f"http://127.0.0.1:{port}"

        async def up() -> bool:
            try:
                async with ClientSession() as http, http.get(f"{base}/health") as r:
                    return r.status == 200
            except OSError:
                return False

        await wait_for(up, timeout=30, interval=0.2, what="the API process")
        fuzz = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json",
            "-H", f"Authorization: Bearer {API_KEY}",
            "--checks", "all", "--exclude-checks", ",".join(CHECKS_SKIPPED),
            "--phases", "examples,coverage,fuzzing,stateful",
            "--max-examples", "30", "--seed", "7", "--max-failures", "20",
            cwd=tmp_path, env=env | {"NO_COLOR": "1"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            output, _ = await asyncio.wait_for(fuzz.communicate(), timeout=FUZZ_TIMEOUT_S)
        finally:  # a timeout (or the test's own) must not leave schemathesis running
            if fuzz.returncode is None:
                fuzz.kill()
                await fuzz.wait()
        hostile = await send_hostile_inputs(base)
    finally:
        await stop_process(web)
        log.close()
    text = output.decode(errors="replace")
    generated = re.search(r"(\d+) generated", text)
    server_errors = len(re.findall(r"\[5\d\d\]", text))
    fault_report(
        f"schemathesis: {generated.group(1) if generated else '?'} cases generated, "
        f"{server_errors} responses with status 5xx, exit code {fuzz.returncode}"
    )
    assert fuzz.returncode == 0, text[-6000:]
    assert generated is not None and int(generated.group(1)) >= 500, text[-2000:]
    assert server_errors == 0
    assert hostile == [400] * len(HOSTILE_INPUTS), hostile  # answered in the same run's log
    lines = (tmp_path / "web.log").read_text(errors="replace").splitlines()
    messages = [json.loads(line)["message"] for line in lines if line.startswith("{")]
    statuses = [m.group(1) for m in map(ACCESS_STATUS.search, messages) if m]
    assert len(statuses) >= 500  # the access log saw the run...
    assert not [s for s in statuses if s.startswith("5")]  # ...and no server error in it

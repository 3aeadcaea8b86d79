"""Waiting for jobs through the API, as a client would."""

from __future__ import annotations

from typing import Any

from tests.helpers import ApiClient, wait_for

FINISHED = {"complete", "failed", "aborted"}


async def wait_job(api: ApiClient, job_id: str, timeout: float = 15) -> dict[str, Any]:
    """Poll GET /jobs/{id} until the job is finished; return its status body."""

    async def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = await (await api.get(f"/jobs/{job_id}")).json()
        return body if body["status"] in FINISHED else None

    return await wait_for(finished, timeout=timeout, what=f"job {job_id} to finish")

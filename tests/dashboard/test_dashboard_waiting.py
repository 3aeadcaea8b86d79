"""A waiting job on the dashboard (plain HTTP): its page shows `waiting` and what it waits
for, its parents linked, and the jobs list offers `waiting` among its states."""

from __future__ import annotations

from arq.connections import ArqRedis

from jobs.engine.queue import enqueue_job
from tests.dashboard.test_dashboard import EMAIL, log_in, ui  # noqa: F401  (the fixture)
from tests.helpers import ApiClient


async def test_a_waiting_job_page_shows_its_parents_linked(
    ui: ApiClient,  # noqa: F811
    api: ApiClient,
    redis: ArqRedis,
) -> None:
    """No worker: the parents never end."""
    await enqueue_job(redis, "noop", _job_id="parent-1")
    await enqueue_job(redis, "noop", _job_id="parent-2")
    response = await api.post("/jobs/email", json=EMAIL | {"after": ["parent-1", "parent-2"]})
    assert response.status == 202, await response.text()
    job_id = (await response.json())["job_id"]
    await log_in(ui)
    page = await (await ui.get(f"/ui/jobs/{job_id}")).text()
    assert 'id="status" class="badge waiting">waiting<' in page
    assert 'id="waiting-for">after:' in page
    for parent in ("parent-1", "parent-2"):
        assert f'<a href="/ui/jobs/{parent}"><code>{parent}</code></a>' in page
    assert "2 of 2 not ended yet" in page
    jobs = await (await ui.get("/ui/jobs")).text()
    assert "<option>waiting</option>" in jobs  # a state the list filters by

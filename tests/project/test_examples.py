"""The example module the README builds (examples/invoices.py), loaded as JOB_MODULES loads it
and run with asyncjobs.testing, as the README tells a user to test their own jobs."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import pytest
from arq.connections import ArqRedis
from pydantic import ValidationError

from asyncjobs import PermanentJobError
from asyncjobs.registry import load_job_modules, unregister
from asyncjobs.testing import job_context, run_job
from tests.conftest import TEST_REDIS_URL


@pytest.fixture
def invoices() -> Iterator[ModuleType]:
    loaded = load_job_modules(["examples.invoices"])
    assert {t.name for t in loaded} >= {"generate_invoice", "purge_old_invoices"}
    yield importlib.import_module("examples.invoices")
    for name in ("generate_invoice", "purge_old_invoices"):
        unregister(name)


async def test_the_example_invoice_job_runs_as_the_worker_would(
    invoices: ModuleType, redis: ArqRedis
) -> None:
    async with job_context(redis_url=TEST_REDIS_URL) as (ctx, recorded):
        invoice = await run_job(invoices.generate_invoice, ctx, order_id=1, email="ada@example.com")
        assert invoice.total_cents == 1999 and invoice.number == "INV-1"
        assert [e.name for e in recorded.enqueued] == ["send_email"]
        assert recorded.enqueued[0].arguments["email"]["to"] == ["ada@example.com"]
        assert recorded.progress == [(1, 2, "rendered"), (2, 2, "emailed")]
        with pytest.raises(PermanentJobError, match="no order 99"):
            await run_job(invoices.generate_invoice, ctx, order_id=99)
        with pytest.raises(ValidationError, match="order_id"):
            await run_job(invoices.generate_invoice, ctx, order_id=0)
        assert await run_job(invoices.purge_old_invoices, ctx, older_than_days=7) == 0

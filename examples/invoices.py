"""A project's own jobs, as the README's "Your own jobs" builds them. Run the service with them:

    JOB_MODULES=examples.invoices asyncjobs dev

then `curl -X POST localhost:8000/jobs/generate_invoice -H "Authorization: Bearer $KEY"
-d '{"order_id": 1, "email": "you@example.com"}'`.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, EmailStr, Field

from asyncjobs import JobContext, PermanentJobError, job

ORDERS = {1: 1999, 2: 4500}  # stands in for your database: order id -> total in cents


class BillingUnavailable(Exception):
    """Your billing service is down or slow: worth another try later."""


class Invoice(BaseModel):
    number: str
    total_cents: int
    emailed_in_job: str  # the id of the email job that sends it


@job(
    tries=5,
    backoff=(2.0, 300.0),
    transient=(BillingUnavailable, ConnectionError),
    priority="transactional",
    shown=("order_id",),
)
async def generate_invoice(
    ctx: JobContext, order_id: int = Field(gt=0), email: EmailStr = "billing@example.com"
) -> Invoice:
    """Render an order's invoice and email it to the customer."""
    total = ORDERS.get(order_id)
    if total is None:  # no retry can make it exist: dead-lettered at once
        raise PermanentJobError(f"no order {order_id}")
    await ctx.progress(1, 2, "rendered")
    await asyncio.sleep(0)  # your rendering, your async database calls
    email_job = await ctx.send_email(
        to=email, subject=f"Invoice INV-{order_id}", text=f"Total: {total / 100:.2f} EUR"
    )
    await ctx.progress(2, 2, "emailed")
    return Invoice(number=f"INV-{order_id}", total_cents=total, emailed_in_job=email_job)


class Cleanup(BaseModel):
    older_than_days: int = Field(30, ge=1, le=3650)


@job(tries=3, schedulable=True)
async def purge_old_invoices(ctx: JobContext, request: Cleanup) -> int:
    """Delete invoices older than a number of days (put it on a schedule: POST /schedules)."""
    await asyncio.sleep(0)
    return 0

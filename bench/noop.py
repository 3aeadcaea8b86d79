"""The no-op job: measures what an engine costs per job when the job itself costs nothing."""

from __future__ import annotations

from typing import Any


async def noop(ctx: dict[str, Any], **kwargs: Any) -> None:
    return None

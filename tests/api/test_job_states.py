"""A job's states are spelled once, in `asyncjobs.JobState`: the OpenAPI document, the
dashboard and the client take them from there, and no code of the API or the client spells a
state as a string of its own."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import app.web  # noqa: F401  (the routes' modules first: app.openapi imports them)
from app.dashboard.data import JOB_STATES
from app.http import JOB_ID_PATTERN
from app.openapi import build_openapi
from asyncjobs import JobState
from asyncjobs.client import JobStatus
from asyncjobs.keys import HEX_ID_PATTERN
from asyncjobs.registry import job_types

ROOT = Path(__file__).resolve().parents[2]
STATES = {state.value for state in JobState}
STATUS_NAMES = {"status", "status_before"}


def _enums(node: Any, path: str = "") -> Iterator[tuple[str, list[Any]]]:
    if isinstance(node, dict):
        if isinstance(node.get("enum"), list):
            yield path, node["enum"]
        for key, value in node.items():
            yield from _enums(value, f"{path}/{key}")
    elif isinstance(node, list):
        for n, value in enumerate(node):
            yield from _enums(value, f"{path}/{n}")


def test_the_openapi_document_takes_its_states_from_job_state() -> None:
    """Every enum of job states in the document is JobState, whole and in order (an enum
    sharing a single word, such as a webhook's `failed`, is another thing)."""
    found = {
        path: values
        for path, values in _enums(build_openapi(dev_mail=True))
        if len(STATES & {str(v) for v in values}) > 1
    }
    assert set(found) >= {
        "/components/schemas/JobView/properties/status",
        "/components/schemas/AbortAccepted/properties/status_before",
        "/components/schemas/ScrapeBatchJob/properties/status",
        "/components/schemas/RunJob/properties/status",
    }
    for path, values in found.items():
        assert values == [state.value for state in JobState], path


def test_the_dashboard_and_the_client_use_job_state() -> None:
    assert tuple(s for s in JobState if s != JobState.NOT_FOUND) == JOB_STATES
    job = JobStatus.from_json({"status": "in_progress"}, "j")
    assert job.status is JobState.IN_PROGRESS and not job.finished
    assert JobStatus.from_json({"status": "aborted"}, "j").finished
    # a state this client does not know (a newer server's) is kept as the server said it
    assert JobStatus.from_json({"status": "paused"}, "j").status == "paused"


def _mentions_status(node: ast.AST) -> bool:
    """`status`, `view.status`, `body["status"]`, `body.get("status")`."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id in STATUS_NAMES:
            return True
        if isinstance(sub, ast.Attribute) and sub.attr in STATUS_NAMES:
            return True
        if isinstance(sub, ast.Constant) and sub.value in STATUS_NAMES:
            return True
    return False


def _spelled_states(node: ast.AST | None) -> list[str]:
    if node is None:
        return []
    return [
        sub.value
        for sub in ast.walk(node)
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value in STATES
    ]


def _states_spelled_by_hand(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """A state string compared with, assigned to or passed as a status; a collection of
    states of its own (a tuple, set or Literal of two or more of them, and nothing else)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            words = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            spelled = [word for word in words if word in STATES]
            # one with a word no job state is (a message's "sent") is another vocabulary
            if len(set(spelled)) > 1 and len(spelled) == len(words):
                for state in spelled:
                    yield node.lineno, state
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_mentions_status(o) for o in operands):
                for o in operands:
                    for state in _spelled_states(o):
                        yield node.lineno, state
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(_mentions_status(t) for t in targets):
                for state in _spelled_states(node.value):
                    yield node.lineno, state
        elif isinstance(node, ast.keyword) and node.arg in STATUS_NAMES:
            for state in _spelled_states(node.value):
                yield node.value.lineno, state


def test_no_state_is_spelled_outside_the_enum() -> None:
    """The API (app/) and the public package (asyncjobs/) compare, assign and pass states as
    JobState members: a `status == "complete"` of its own would drift from the enum."""
    files = [*(ROOT / "app").rglob("*.py"), *(ROOT / "asyncjobs").rglob("*.py")]
    assert len(files) > 20
    spelled = [
        f"{path.relative_to(ROOT)}:{line}: {state!r}"
        for path in files
        if path.name != "jobstate.py"
        for line, state in _states_spelled_by_hand(ast.parse(path.read_text(), str(path)))
    ]
    assert spelled == []


def test_the_scan_finds_a_state_spelled_by_hand() -> None:
    code = 'if view.status == "complete": view.status = "failed"\nJobView(status="queued")\n'
    code += 'DONE = frozenset({"complete", "aborted"})\nDONE = ("done", "failed")\n'
    assert sorted(s for _, s in _states_spelled_by_hand(ast.parse(code))) == [
        "aborted", "complete", "complete", "failed", "queued"
    ]  # fmt: skip


def test_the_job_id_patterns_come_from_one_place() -> None:
    """Ids of 32 hex digits are HEX_ID_PATTERN; /jobs/{job_id} refuses exactly the segments
    of the built-ins' endpoints (from the registry) and /jobs/types."""
    endpoints = {t.public_name for t in job_types() if t.builtin and t.public_name}
    assert {"email", "newsletter", "scrape", "export", "report", "image", "http"} <= endpoints
    for fixed in [*endpoints, "types"]:
        assert not re.fullmatch(JOB_ID_PATTERN, fixed), fixed
        assert re.fullmatch(JOB_ID_PATTERN, f"{fixed}x")
    assert re.fullmatch(JOB_ID_PATTERN, "0" * 32) and re.fullmatch(HEX_ID_PATTERN, "0" * 32)
    assert not re.fullmatch(HEX_ID_PATTERN, "A" * 32)
    hand_written = [
        f"{path.relative_to(ROOT)}"
        for root in ("app", "asyncjobs", "jobs")
        for path in (ROOT / root).rglob("*.py")
        if path != ROOT / "asyncjobs" / "keys.py" and "{32}" in path.read_text()
    ]
    assert hand_written == []

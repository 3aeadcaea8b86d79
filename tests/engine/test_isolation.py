"""One test's failure stays its own: a teardown that is cancelled (a BaseException) must not
leave its fixtures cached for the next test, as it did before `isolated_teardown`."""

from __future__ import annotations

import pytest

from tests.faults.procs import REPO

INNER = """
import asyncio
import pytest
from tests.conftest import isolated_teardown

made, closed = [], []

@pytest.fixture
@isolated_teardown
async def client():  # set up first, so torn down after `resource`
    made.append(object())
    yield made[-1]
    closed.append(made[-1])

@pytest.fixture
@isolated_teardown
async def resource(client):
    yield client
    if len(made) == 1:
        raise asyncio.CancelledError  # the first test's teardown is cancelled

async def test_first(resource):
    assert len(made) == 1

async def test_second_gets_fresh_fixtures(resource, client):
    assert closed == [made[0]], "the first test's client was never closed"
    assert len(made) == 2 and client is made[1], "the first test's client was reused"
"""


@pytest.mark.parametrize("wrapped", [True, False])
@pytest.mark.slow
def test_a_cancelled_teardown_fails_only_its_own_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, wrapped: bool
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    source = INNER if wrapped else INNER.replace("@isolated_teardown\n", "")
    pytester.makepyfile(test_inner=source)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-o", "asyncio_mode=auto")
    outcomes = result.parseoutcomes()
    if wrapped:  # the teardown error is reported on the first test; the second is untouched
        assert (outcomes.get("passed"), outcomes.get("errors")) == (2, 1), result.stdout.str()
        result.stdout.fnmatch_lines(["*RuntimeError: the teardown of resource was cancelled*"])
    else:  # what happened before: the client is never closed and the next test reuses it
        assert outcomes.get("failed") == 1, result.stdout.str()
        result.stdout.fnmatch_lines(["*the first test's client was never closed*"])

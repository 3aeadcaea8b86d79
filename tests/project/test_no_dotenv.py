"""The suite ignores a developer's `.env`: Settings read one from the working directory, and a
test's outcome must not depend on what a laptop has there (issue 29, hidden dependencies)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

DOTENV = """\
REDIS_URL=redis://10.255.255.1:1/5
QUEUE_NAME=leaked:queue
API_KEYS=leaked-key
RATE_LIMIT_REQUESTS=3
"""

INNER = """
import os
from pathlib import Path

from asyncjobs.settings import Settings, get_settings
from tests.conftest import TEST_REDIS_URL


def test_a_dotenv_in_the_cwd_reaches_no_settings(settings: Settings) -> None:
    assert "leaked" in Path(".env").read_text()
    for read in (Settings(), get_settings()):
        assert read.redis_url == "redis://127.0.0.1:6379/0" and read.queue_name == "arq:queue"
        assert read.api_keys == [] and read.rate_limit_requests != 3
        assert read.api_read_keys == []  # nor a service setting of the shell that runs pytest
    assert settings.queue_name == "arq:queue" and settings.redis_url == TEST_REDIS_URL


def test_the_inner_run_uses_the_outer_runs_redis() -> None:
    assert TEST_REDIS_URL == os.environ["OUTER_TEST_REDIS_URL"]
"""


@pytest.mark.slow
def test_the_suite_ignores_a_dotenv_in_its_working_directory(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh pytest process, in a folder with a `.env` setting Redis, the queue, the API keys
    and the rate limit, and with API_READ_KEYS in its environment, loads the suite's fixtures:
    none of these values reaches a Settings."""
    (pytester.path / ".env").write_text(DOTENV)
    pytester.makeconftest('pytest_plugins = ["tests.conftest"]')
    pytester.makepyfile(test_inner=INNER)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OUTER_TEST_REDIS_URL", os.environ["TEST_REDIS_URL"])
    for name in ("REDIS_URL", "QUEUE_NAME", "API_KEYS", "RATE_LIMIT_REQUESTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("API_READ_KEYS", "leaked-from-the-shell")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-o", "asyncio_mode=auto")
    result.assert_outcomes(passed=2)

"""docker-compose.yml cannot run here (no Docker engine): check that it matches the real code."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from app.__main__ import main
from asyncjobs.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return loaded


def test_services_and_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    default = {name for name, service in services.items() if "profiles" not in service}
    assert default == {"redis", "mailpit", "web", "worker"}
    ha = {name for name, service in services.items() if service.get("profiles") == ["ha"]}
    assert ha == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    tracing = {n for n, service in services.items() if service.get("profiles") == ["tracing"]}
    assert tracing == {"jaeger"}
    for name, service in services.items():
        assert "test" in service["healthcheck"], name
    assert services["mailpit"]["image"].startswith("axllent/mailpit:")
    for name in ("web", "worker"):
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"


def test_environment_names_are_real_settings(compose: dict[str, Any]) -> None:
    known = {name.upper() for name in Settings.model_fields} | {"LOG_LEVEL"}
    for name in ("web", "worker"):
        env = compose["services"][name]["environment"]
        own = {k for k in env if not k.startswith("OTEL_")}  # OpenTelemetry's, not ours
        assert own <= known, own - known
        assert urlsplit(env["REDIS_URL"]).hostname == "redis"
        assert env["SMTP_HOST"] == "mailpit"
        assert "SMTP_PASSWORD" not in env  # secrets come from the environment, not the repo
        values: dict[str, Any] = {
            k.lower(): interpolated(v) for k, v in env.items() if k in own - {"LOG_LEVEL"}
        }
        Settings(_env_file=None, **values)


def interpolated(value: str) -> str:
    """A value as compose hands it over with nothing set in the shell: `${X:-d}` is d, and a
    required `${X:?...}` stands for something the user sets."""
    return re.sub(
        r"\$\{\w+(?::-([^}]*)|:\?[^}]*)\}",
        lambda m: m.group(1) if m.group(1) is not None else "set-by-the-user",
        value,
    )


def test_web_command_and_port_match_the_code(compose: dict[str, Any]) -> None:
    web = compose["services"]["web"]
    assert web["command"] == ["python", "-m", "app", "web"]
    with pytest.raises(SystemExit) as exit_info:
        main(["web", "--help"])  # the subcommand exists
    assert exit_info.value.code == 0
    port = web["environment"]["WEB_PORT"]
    assert f"{port}:{port}" in web["ports"]
    assert port in " ".join(web["healthcheck"]["test"])


def test_worker_command_names_the_real_settings_class(compose: dict[str, Any]) -> None:
    command = compose["services"]["worker"]["command"]
    assert command[0] == "arq"
    module_name, _, attr = command[1].rpartition(".")
    worker_settings = getattr(importlib.import_module(module_name), attr)
    names = {f.name for f in worker_settings.functions}
    assert {"send_email", "scrape"} <= names
    assert compose["services"]["worker"]["healthcheck"]["test"][1:] == [
        "arq",
        "--check",
        command[1],
    ]


def test_dockerfile_copies_what_exists() -> None:
    lines = (REPO / "Dockerfile").read_text().splitlines()
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source


def test_dockerfile_copies_every_package_the_install_needs() -> None:
    """`pip install .` in the image builds what pyproject.toml lists: each of it must be there."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    needed = {name.split(".")[0] for name in project["packages"]}
    needed |= {f"{module}.py" for module in project["py-modules"]}
    copied = set()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied |= set(line.split()[1:-1])
    assert needed <= copied, needed - copied


def test_worker_is_given_time_to_finish_its_jobs(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    grace = float(
        worker["environment"].get("SHUTDOWN_GRACE", Settings.model_fields["shutdown_grace"].default)
    )
    assert float(worker["stop_grace_period"].removesuffix("s")) > grace
    assert "--appendonly" in compose["services"]["redis"]["command"]


def test_the_ha_profile_matches_the_sentinel_settings(compose: dict[str, Any]) -> None:
    """The sentinels watch the primary under the master name the settings default to, and the
    replica follows the primary; both sides refuse writes rather than evict job keys."""
    services = compose["services"]
    script = " ".join(services["sentinel-1"]["command"])
    assert f"sentinel monitor {Settings().redis_sentinel_master} redis 6379 2" in script
    assert services["sentinel-2"] == services["sentinel-1"] == services["sentinel-3"]
    assert services["redis-replica"]["command"][-3:] == ["--replicaof", "redis", "6379"]
    for name in ("redis", "redis-replica"):
        command = services[name]["command"]
        assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    env = services["worker"]["environment"]
    assert env["REDIS_SENTINELS"] == "${REDIS_SENTINELS:-}"  # empty: one Redis, no sentinels
    assert Settings(redis_sentinels="").redis_sentinels == []


def test_the_tracing_profile_is_off_unless_the_shell_turns_it_on(compose: dict[str, Any]) -> None:
    """Jaeger takes OTLP over HTTP; web and worker trace only with an endpoint set."""
    from asyncjobs.tracing import configured_by_environment

    for name in ("web", "worker"):
        env = {k: interpolated(v) for k, v in compose["services"][name]["environment"].items()}
        assert not configured_by_environment(env)
        assert configured_by_environment(
            env | {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"}
        )
    assert compose["services"]["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"

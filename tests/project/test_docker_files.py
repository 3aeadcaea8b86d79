"""Exports and images under Docker (no engine here: docker-compose.yml and the Dockerfile are
read as Docker would). The worker writes the files and the web process serves them, so both
must mount one named volume where EXPORTS_DIR and IMAGES_DIR point, and the non-root user the
image runs as must own those folders: a new named volume takes the ownership of the image's
folder at its mount point, so the Dockerfile makes them and gives them to that user first."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FILE_DIRS = ("EXPORTS_DIR", "IMAGES_DIR")
SERVERS = ("web", "worker")


@dataclass
class Image:
    """What the Dockerfile's instructions leave: env, workdir, and the folders made and chowned
    (with the user named) before the first USER that is not root."""

    env: dict[str, str] = field(default_factory=dict)
    workdir: PurePosixPath = field(default_factory=lambda: PurePosixPath("/"))
    user: str | None = None
    users_created: set[str] = field(default_factory=set)
    made: set[PurePosixPath] = field(default_factory=set)
    owned: dict[PurePosixPath, tuple[str, bool]] = field(default_factory=dict)  # user, -R


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def read_dockerfile(text: str) -> Image:
    image = Image()
    for word, rest in instructions(text):
        if word == "WORKDIR":
            image.workdir = image.workdir / rest
        elif word == "ENV":
            image.env |= dict(pair.split("=", 1) for pair in shlex.split(rest))
        elif word == "USER" and image.user is None and rest.split(":")[0] not in ("root", "0"):
            image.user = rest.split(":")[0]
        elif word == "RUN" and image.user is None:
            for command in re.split(r"&&|;", rest):
                run_as_root(image, shlex.split(command))
    return image


def run_as_root(image: Image, argv: list[str]) -> None:
    """The effect of one shell command of a RUN on what the test checks."""
    if not argv:
        return
    options = {a for a in argv[1:] if a.startswith("-")}
    operands = [a for a in argv[1:] if not a.startswith("-")]
    if argv[0] == "useradd":
        image.users_created.add(argv[-1])
    elif argv[0] == "mkdir":
        paths = {image.workdir / a for a in operands}
        image.made |= paths
        if options & {"-p", "--parents"}:
            image.made |= {parent for path in paths for parent in path.parents}
    elif argv[0] == "chown" and operands:
        owner, recursive = operands[0].split(":")[0], bool(options & {"-R", "--recursive"})
        for operand in operands[1:]:
            image.owned[image.workdir / operand] = (owner, recursive)


def owner_of(image: Image, path: PurePosixPath) -> str | None:
    """Who owns `path` once the RUNs are done: its own chown, or an ancestor's chown -R."""
    if path in image.owned:
        return image.owned[path][0]
    for parent in path.parents:
        if image.owned.get(parent, ("", False))[1]:
            return image.owned[parent][0]
    return None


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return loaded


@pytest.fixture(scope="module")
def image() -> Image:
    return read_dockerfile((REPO / "Dockerfile").read_text())


def named_mounts(compose: dict[str, Any], service: str) -> dict[PurePosixPath, str]:
    """A service's named-volume mounts: target -> volume (short or long syntax)."""
    mounts = {}
    for volume in compose["services"][service].get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
        else:
            if volume.get("type", "volume") != "volume":
                continue
            source, target = volume.get("source", ""), volume["target"]
        if source and not source.startswith(("/", ".", "~", "$")):  # not a bind mount
            mounts[PurePosixPath(target)] = source
    return mounts


def file_dirs(compose: dict[str, Any], image: Image, service: str) -> dict[str, PurePosixPath]:
    """Where the service's processes write or read the files: compose's environment over the
    image's ENV, over the settings' defaults; relative paths from the image's WORKDIR."""
    env = image.env | compose["services"][service].get("environment", {})
    defaults = {"EXPORTS_DIR": "var/exports", "IMAGES_DIR": "var/images"}
    return {name: image.workdir / env.get(name, defaults[name]) for name in FILE_DIRS}


def volume_holding(mounts: dict[PurePosixPath, str], path: PurePosixPath) -> tuple[str, Any]:
    for target, volume in mounts.items():
        if path == target or target in path.parents:
            return volume, target
    raise AssertionError(f"{path} is in no named volume: {mounts}")


def test_web_and_worker_share_one_named_volume_holding_both_folders(
    compose: dict[str, Any], image: Image
) -> None:
    placements = set()
    for service in SERVERS:
        mounts = named_mounts(compose, service)
        dirs = file_dirs(compose, image, service)
        for name, path in dirs.items():
            volume, target = volume_holding(mounts, path)
            assert volume in compose.get("volumes", {}), f"{volume} is not a declared volume"
            placements.add((name, path, volume, target))
    # the same folder, in the same volume, at the same place, in both services
    assert len(placements) == len(FILE_DIRS), placements


def test_the_image_makes_those_folders_for_its_user_before_switching_to_it(
    compose: dict[str, Any], image: Image
) -> None:
    assert image.user is not None and image.user in image.users_created
    for service in SERVERS:
        mounts = named_mounts(compose, service)
        for name, path in file_dirs(compose, image, service).items():
            _, target = volume_holding(mounts, path)
            for folder in [path, *[p for p in path.parents if target in (p, *p.parents)]]:
                assert folder in image.made, f"{folder} ({name}) is not made before USER"
            assert owner_of(image, path) == image.user, f"{path} ({name}) is not the user's"


def test_the_dockerfile_reader_sees_what_a_broken_dockerfile_misses() -> None:
    """The checks above fail on the Dockerfile as it was: folders never made, nor owned."""
    before = read_dockerfile(
        "FROM python:3.11-slim\nWORKDIR /srv\n"
        "RUN pip install . && useradd --system --no-create-home asyncjobs\n"
        "USER asyncjobs\nENV WEB_HOST=0.0.0.0\n"
    )
    assert before.user == "asyncjobs" and not before.made and not before.owned
    late = read_dockerfile(
        "FROM x\nWORKDIR /srv\nRUN useradd a\nUSER a\nRUN mkdir -p var/exports && chown a var\n"
    )
    assert not late.made  # made after USER: as that user, in a folder root owns
    made = read_dockerfile(
        "FROM x\nWORKDIR /srv\nRUN useradd a && \\\n    mkdir -p var/exports \\\n"
        "    && chown -R a:a /srv/var\nUSER a\n"
    )
    exports = PurePosixPath("/srv/var/exports")
    assert exports in made.made and owner_of(made, exports) == "a"

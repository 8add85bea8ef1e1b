"""The Dockerfile, read as text (no Docker needed): what `make docker-test` would only find out after a
long build. Every package pyproject installs is copied in (``cli`` once was not, and ``pip install .``
then built an image whose ``predgate`` script could not import), the legacy builder can build it (no
``# syntax`` line, which makes BuildKit pull a frontend image, no BuildKit-only RUN flags), and the
stage order keeps a ``--target cpu`` legacy build from building the GPU or bundled stages."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(line for line in DOCKERFILE.splitlines() if not line.startswith("#"))
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in joined.splitlines()
        if line.strip()
    ]


def _stages() -> list[tuple[str, str]]:
    """(base, name) per FROM, in file order."""
    stages = []
    for op, rest in _instructions():
        if op == "FROM":
            words = rest.split()
            stages.append((words[0], words[2] if len(words) > 2 and words[1].upper() == "AS" else ""))
    return stages


def test_every_package_directory_is_copied_in() -> None:
    copied = {rest.split()[-2] for op, rest in _instructions() if op == "COPY" and "--from" not in rest}
    packages = [
        pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    assert packages and all(p in copied for p in packages), (packages, copied)
    for needed in ("pyproject.toml", "README.md"):  # pip install . reads both (readme = "README.md")
        assert any(op == "COPY" and needed in rest.split() for op, rest in _instructions()), needed


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for name in [p.rstrip("*") for p in include] + ["pyproject.toml", "README.md"]:
        assert not any(fnmatch.fnmatch(name, p) for p in patterns), name


def test_the_legacy_builder_can_build_it() -> None:
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE, re.MULTILINE | re.IGNORECASE)
    for op, rest in _instructions():
        if op == "RUN":
            assert not re.match(r"--(mount|network|security)", rest), rest


def test_base_image_and_extra_cas_are_arguments_and_torch_is_the_project_pin() -> None:
    ops = _instructions()
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in ops
    assert _stages()[0][0] == "${PYTHON_IMAGE}"
    assert any(op == "ARG" and rest.startswith("EXTRA_CA_CERTS") for op, rest in ops)
    pins = {d for d in PYPROJECT["project"]["dependencies"] if d.startswith(("torch==", "torchvision=="))}
    assert pins and all(pin in DOCKERFILE for pin in pins), pins


def test_cpu_comes_first_runs_as_non_root_and_is_the_default() -> None:
    stages = _stages()
    names = [name for _, name in stages]
    assert names[:2] == ["base", "cpu"], names  # the legacy builder builds every stage up to the target
    assert stages[-1][0] == "cpu", stages  # no --target: the CPU image
    users = [rest.strip() for op, rest in _instructions() if op == "USER"]
    assert users and users[-1] not in ("root", "0"), users

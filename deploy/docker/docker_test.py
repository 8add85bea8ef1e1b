"""``make docker-test``: build the CPU image and check it as it is meant to run, against a local server.

Unit tests cannot show that the image works: that its packages install behind the network's proxy, that
it starts on a read-only root filesystem as a non-root user, answers exactly like the code it was built
from, and stops cleanly when the orchestrator sends SIGTERM. This builds the image with the legacy
builder (``DOCKER_BUILDKIT=0``; no buildx needed) on the local Debian base (``make docker-base``), runs
it with the bundle mounted read-only, and checks each of those, plus image size and start-up time.

The result goes to ``reports/scaling/docker-test.json``; a table is printed; the exit status is 1 when
a check failed (each failure says what), 2 when the test could not run (no daemon, no base, no build).
Needs a Docker daemon and the project's venv (run with ``.venv/bin/python``); docs/containers.md.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# after the path: the repository's packages, from a run as `python deploy/docker/docker_test.py`
import httpx
import numpy as np
from PIL import Image

from bench.serve import bundle_pngs, png_bytes
from tests.deploy.processes import free_port, start_server, stop, wait_ready

PEM = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")
LOG_DIR = ROOT / "build" / "docker-test"
"""Build and server logs (git-ignored; the JSON result goes to --json)."""
STOCK_CA_DIR = Path("/usr/share/ca-certificates")
ARG_LIMIT = 120_000
"""Largest build argument passed: one execve string may hold 128 KiB (MAX_ARG_STRLEN), and a full CA
bundle (about 220 KB on Debian) is more."""
VOLATILE = {"timings_ms", "request_id", "batch_size"}
"""Answer fields that differ between two servers by nature (times, ids, batching)."""
FLOAT_TOLERANCE = 1e-5
TORCH = next(
    d.split("==")[1]
    for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    if d.startswith("torch==")
)
"""The torch version pyproject pins, which the image must carry (not a wheel that happens to be at hand)."""
CLEAN_SHUTDOWN = ("Shutting down", "Application shutdown complete", "Finished server process")
GRACEFUL_CODES = (0, 143)
"""0: uvicorn re-raises SIGTERM after its graceful shutdown, which PID 1 of a container ignores, so the
process returns normally; 143 (128 + SIGTERM) where it is not PID 1 (e.g. under --init). 137 = killed."""


@dataclass
class Check:
    """One pass/fail line of the report."""

    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    image: str
    base_image: str
    bundle: str
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


class CannotRun(RuntimeError):
    """The test could not get as far as checking the image (exit status 2)."""


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``docker ARGS``, output captured; a failure raises CannotRun when ``check``."""
    result = subprocess.run(["docker", *args], check=False, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        error = result.stderr.strip()[-2000:]
        raise CannotRun(f"docker {' '.join(args[:3])} failed ({result.returncode}): {error}")
    return result


def _pem_body(pem: str) -> str:
    return "".join(pem.split()[2:-2])


def extra_ca_text(path: Path) -> str:
    """The PEM text of ``path`` for the EXTRA_CA_CERTS build argument. A bundle too large for one argument
    (a whole system bundle) is cut to the certificates Debian's ca-certificates does not ship (under
    /usr/share/ca-certificates): the base image trusts those already, and the rest are the local ones,
    e.g. a TLS-inspecting proxy's."""
    text = path.read_text()
    if len(text.encode()) <= ARG_LIMIT:
        return text.rstrip("\n")
    stock = {_pem_body(p) for f in STOCK_CA_DIR.rglob("*.crt") for p in PEM.findall(f.read_text())}
    extra = "\n".join(p for p in PEM.findall(text) if _pem_body(p) not in stock)
    if len(extra.encode()) > ARG_LIMIT:
        raise CannotRun(f"{path}: {len(extra)} bytes of CA certificates beyond the stock set; pass only the "
                        "certificates to add (EXTRA_CA_FILE=proxy-ca.pem)")
    return extra


def build(args: argparse.Namespace, log: Path) -> float:
    """The CPU image with the legacy builder; build output in ``log``; the seconds it took."""
    command = ["docker", "build", "--target", "cpu", "--network", args.build_network, "-t", args.image,
               "--build-arg", f"PYTHON_IMAGE={args.base_image}"]
    if args.extra_ca_file:
        command += ["--build-arg", f"EXTRA_CA_CERTS={extra_ca_text(Path(args.extra_ca_file))}"]
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    started = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.run(
            [*command, "."], check=False, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise CannotRun(f"docker build failed ({code}); the end of {log}:\n{tail}")
    return time.monotonic() - started


def differences(local: Any, remote: Any, where: str = "") -> list[str]:
    """Where two answers differ: exactly for labels, verdicts and names, within FLOAT_TOLERANCE for
    floats; VOLATILE fields are skipped."""
    if isinstance(local, dict) and isinstance(remote, dict):
        found: list[str] = []
        for key in sorted(set(local) | set(remote)):
            if key in VOLATILE:
                continue
            if key not in local or key not in remote:
                found.append(f"{where}.{key}: only on {'local' if key in local else 'container'}")
            else:
                found += differences(local[key], remote[key], f"{where}.{key}")
        return found
    if isinstance(local, list) and isinstance(remote, list):
        if len(local) != len(remote):
            return [f"{where}: {len(local)} items locally, {len(remote)} in the container"]
        return [d for i, (a, b) in enumerate(zip(local, remote)) for d in differences(a, b, f"{where}[{i}]")]
    if isinstance(local, float) and isinstance(remote, float) and not isinstance(local, bool):
        same = math.isclose(local, remote, rel_tol=0, abs_tol=FLOAT_TOLERANCE)
        return [] if same else [f"{where}: {local!r} locally, {remote!r} in the container"]
    return [] if local == remote else [f"{where}: {local!r} locally, {remote!r} in the container"]


def test_images(bundle: Path, n: int) -> tuple[list[bytes], str]:
    """``n`` validation images and a quarter as many random-pixel ones (which the gate tends to answer
    unknown, so both verdicts are compared), as PNGs."""
    images, source = bundle_pngs(bundle, n)
    first = np.asarray(Image.open(io.BytesIO(images[0])))
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(max(1, n // 4), *first.shape), dtype=np.uint8)
    noise = noise[..., None] if noise.ndim == 3 else noise
    return images + png_bytes(noise), f"{source} + {len(noise)} random-pixel"


def answers(base: str, images: list[bytes]) -> list[dict[str, Any]]:
    """One /predict per image, one at a time (batch size 1 on both sides), with the full evidence."""
    with httpx.Client(base_url=base, timeout=60) as client:
        out = []
        for image in images:
            response = client.post("/predict", params={"full_evidence": "true"}, content=image,
                                   headers={"content-type": "image/png"})
            response.raise_for_status()
            out.append(response.json())
        return out


def wait_http_ready(base: str, name: str, timeout: float) -> float:
    """Seconds until ``base``/readyz answers 200; CannotRun if the container exits or time runs out."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        state = docker("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name).stdout.split()
        if state and state[0] == "exited":
            logs = docker("logs", "--tail", "40", name, check=False)
            raise CannotRun(f"container exited ({state[1]}) before ready:\n{logs.stdout}{logs.stderr}")
        time.sleep(0.2)
    raise CannotRun(f"container not ready within {timeout:.0f} s")


@contextmanager
def readable_bundle(bundle: Path, report: Report) -> Iterator[Path]:
    """``bundle`` itself when the container's user (uid 10001) can read all of it; else a copy that it
    can read. Bundles built before ``predgate build`` set its files' modes from the umask have 0600
    files (atomic writes through mkstemp); the copy leaves the owner's files as they are."""
    files = [p for p in bundle.rglob("*") if ".work" not in p.relative_to(bundle).parts]
    if all(p.stat().st_mode & (stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0)) for p in files):
        report.figures["bundle_mounted"] = "as it is"
        yield bundle
        return
    with tempfile.TemporaryDirectory(prefix="predgate-docker-test-") as tmp:
        copy = Path(tmp) / bundle.name
        shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns(".work"))
        for path in [Path(tmp), copy, *copy.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        report.figures["bundle_mounted"] = "a world-readable copy (the bundle's files are not)"
        yield copy


@contextmanager
def container(args: argparse.Namespace, port: int, bundle: Path) -> Iterator[tuple[str, float]]:
    """The image running as in production (read-only root, /tmp a tmpfs, bundle read-only); its name
    and the seconds from `docker run` to ready. Removed afterwards whatever happened."""
    name = f"predgate-docker-test-{os.getpid()}"
    docker("rm", "-f", name, check=False)
    started = time.monotonic()
    docker("run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp", "-p", f"127.0.0.1:{port}:8000",
           "-v", f"{bundle}:/bundle:ro", "-e", "OMP_NUM_THREADS=1", args.image)
    try:
        wait_http_ready(f"http://127.0.0.1:{port}", name, args.startup_timeout)
        yield name, time.monotonic() - started
    finally:
        docker("rm", "-f", name, check=False)


def check_container(report: Report, name: str) -> None:
    """Non-root, read-only root filesystem with a writable /tmp."""
    uid = docker("exec", name, "id", "-u").stdout.strip()
    report.check("non-root user", uid.isdigit() and int(uid) != 0, f"uid {uid}")
    readonly = docker("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", name).stdout.strip()
    outside = docker("exec", name, "sh", "-c", "touch /app/probe", check=False)
    inside = docker("exec", name, "sh", "-c", "touch /tmp/probe && rm /tmp/probe", check=False)
    report.check(
        "read-only root filesystem",
        readonly == "true" and outside.returncode != 0 and inside.returncode == 0,
        f"ReadonlyRootfs={readonly}; write to /app: {outside.stderr.strip() or 'succeeded'}; "
        f"write to /tmp: {'ok' if inside.returncode == 0 else inside.stderr.strip()}",
    )


def check_same_answers(report: Report, remote: str, local: str, images: list[bytes], source: str) -> None:
    local_answers, remote_answers = answers(local, images), answers(remote, images)
    found = differences(local_answers, remote_answers)
    verdicts = [a["verdict"] for a in remote_answers]
    report.check(
        "/predict equals the local server's",
        not found,
        f"{len(images)} images ({source}), full evidence; verdicts {verdicts.count('accept')} accept, "
        f"{verdicts.count('unknown')} unknown" + (f"; differences: {found[:5]}" if found else ""),
    )


def check_graceful_stop(report: Report, name: str, grace_s: int) -> None:
    """SIGTERM (docker stop), then the exit code, the time it took and the shutdown lines of the log."""
    started = time.monotonic()
    docker("stop", "--time", str(grace_s), name, timeout=grace_s + 30)
    seconds = time.monotonic() - started
    code = int(docker("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())
    logs = docker("logs", name)
    text = logs.stdout + logs.stderr
    missing = [line for line in CLEAN_SHUTDOWN if line not in text]
    report.figures["stop_seconds"] = round(seconds, 2)
    report.check(
        "graceful stop on SIGTERM",
        code in GRACEFUL_CODES and seconds < grace_s and not missing,
        f"exit code {code} after {seconds:.1f} s (grace {grace_s} s)"
        + (f"; log lacks {missing}" if missing else "; log shows a clean shutdown"),
    )


def run(args: argparse.Namespace) -> Report:
    report = Report(image=args.image, base_image=args.base_image, bundle=args.bundle)
    if not (ROOT / args.bundle / "manifest.json").is_file():
        raise CannotRun(f"no bundle at {args.bundle}: make bundle")
    if docker("info", "--format", "{{.ServerVersion}}", check=False).returncode != 0:
        raise CannotRun("no Docker daemon: start it (as root: nohup dockerd >/tmp/dockerd.log 2>&1 &)")
    if docker("image", "inspect", args.base_image, check=False).returncode != 0:
        raise CannotRun(f"base image {args.base_image} missing: make docker-base")
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    if not args.no_build:
        report.figures["build_seconds"] = round(build(args, LOG_DIR / "build.log"), 1)
    size = int(docker("image", "inspect", "--format", "{{.Size}}", args.image).stdout.strip())
    report.figures["image_size_bytes"] = size
    report.figures["image_size_gb"] = round(size / 1e9, 2)
    report.figures["torch"] = docker("run", "--rm", "--entrypoint", "python", args.image, "-c",
                                     "import torch; print(torch.__version__)").stdout.strip()
    torch = report.figures["torch"]
    report.check("torch is the project's pin", torch.split("+")[0] == TORCH, f"torch {torch} (pyproject: {TORCH})")
    images, source = test_images(ROOT / args.bundle, args.images)
    port = free_port()
    with (
        readable_bundle(ROOT / args.bundle, report) as bundle,
        container(args, port, bundle) as (name, startup_s),
    ):
        report.figures["startup_seconds"] = round(startup_s, 2)
        report.check("ready (/readyz 200)", True, f"{startup_s:.1f} s from docker run")
        check_container(report, name)
        local_port = free_port()
        log = LOG_DIR / "local-server.log"
        local = start_server(ROOT / args.bundle, local_port, log)
        try:
            wait_ready(local, f"http://127.0.0.1:{local_port}", log, timeout=args.startup_timeout)
            remote, local_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{local_port}"
            check_same_answers(report, remote, local_base, images, source)
        finally:
            stop(local)
        check_graceful_stop(report, name, args.stop_grace)
    return report


def print_table(report: Report) -> None:
    width = max(len(c.name) for c in report.checks) if report.checks else 10
    for c in report.checks:
        print(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
    for key, value in report.figures.items():
        print(f"      {key:<{width}}  {value}")
    print("docker-test:", "passed" if report.passed else "FAILED")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="predgate:cpu")
    parser.add_argument("--base-image", default="predgate-base:bookworm", help="PYTHON_IMAGE of the build")
    parser.add_argument("--bundle", default="bundles/fashion-mnist-quick", help="relative to the repository")
    parser.add_argument("--extra-ca-file", default="", help="PEM file for EXTRA_CA_CERTS (empty: none)")
    parser.add_argument("--build-network", default="host", help="network of the build's RUN steps")
    parser.add_argument("--no-build", action="store_true", help="check the image as it is")
    parser.add_argument("--images", type=int, default=16, help="test images sent to both servers")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--stop-grace", type=int, default=30, help="docker stop --time")
    parser.add_argument("--json", default="reports/scaling/docker-test.json", help="relative to the repo")
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except CannotRun as exc:
        print(f"docker-test: could not run: {exc}", file=sys.stderr)
        return 2
    (ROOT / args.json).parent.mkdir(parents=True, exist_ok=True)
    (ROOT / args.json).write_text(json.dumps(asdict(report), indent=2) + "\n")
    print_table(report)
    failed = [c.name for c in report.checks if not c.ok]
    if failed:
        print(f"docker-test: failed checks: {', '.join(failed)}", file=sys.stderr)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

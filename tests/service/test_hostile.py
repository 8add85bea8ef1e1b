"""The hostile-input suite (:mod:`bench.hostile_cases`): every case gets the answer a correct server
gives (a JSON 4xx naming the problem, or 200 for an odd but valid image), never a 5xx, and the server
keeps serving. In process for each case, then the whole suite through ``python -m bench.hostile``
against a real server process whose peak resident memory is measured."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bench import hostile
from bench.hostile_cases import Case, Target, build_cases, check_answer
from tests.deploy.processes import free_port, start_server, stop, wait_ready

CASES = build_cases(Target())
IN_PROCESS = [case for case in CASES if case.raw is None]
RSS_GROWTH_BOUND_MIB = 300.0
"""The stated bound: the suite (bombs, 8 MiB bodies, 64-image batches) may grow the server's resident
memory by at most this much over what it held when ready."""


def test_the_catalogue_has_at_least_sixty_kinds_in_every_group() -> None:
    names = [case.name for case in CASES]
    assert len(set(names)) == len(names) >= 60
    groups = {case.group for case in CASES}
    assert {"image", "multipart", "json", "tensor", "base64", "batch", "query", "headers", "http"} <= groups


def test_checker_flags_wrong_answers() -> None:
    """The suite's verdicts can fail: 5xx, wrong status, non-JSON, wrong type, message not naming it."""
    case = Case("x", "json", expect=(422,), error_type="invalid_input", fragment="base64")
    good = json.dumps({"error": {"type": "invalid_input", "message": "not valid base64"}}).encode()
    assert check_answer(case, 422, good) is None
    assert "server error" in str(check_answer(case, 500, good))
    assert "status 413" in str(check_answer(case, 413, good))
    assert "not JSON" in str(check_answer(case, 422, b"<html>"))
    wrong_type = json.dumps({"error": {"type": "validation_error", "message": "base64"}}).encode()
    assert "error type" in str(check_answer(case, 422, wrong_type))
    vague = json.dumps({"error": {"type": "invalid_input", "message": "bad request"}}).encode()
    assert "does not name" in str(check_answer(case, 422, vague))


@pytest.fixture(scope="module")
def hostile_client(app_client: Callable[..., TestClient]) -> Iterator[TestClient]:
    with app_client(warmup=False, signal_set="msp") as client:
        yield client


@pytest.mark.parametrize("case", IN_PROCESS, ids=[case.name for case in IN_PROCESS])
def test_hostile_case_in_process(hostile_client: TestClient, case: Case) -> None:
    response = hostile_client.request(
        case.method, case.path, content=case.content or None, headers=case.headers
    )
    assert check_answer(case, response.status_code, response.content) is None, response.text[:300]
    assert response.headers.get("x-request-id")  # every answer, refusals included, names its request
    assert hostile_client.get("/healthz").status_code == 200


@pytest.mark.integration
def test_hostile_suite_against_a_real_server(tiny_bundle: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    process = start_server(tiny_bundle, port, log, env={"PREDGATE_SIGNAL_SET": "msp"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base, log)
        out = tmp_path / "hostile.json"
        code = hostile.main(["--url", base, "--server-pid", str(process.pid), "--json", str(out)])
        report = json.loads(out.read_text())
        assert process.poll() is None, log.read_text()[-3000:]
    finally:
        stop(process)
    failed = [c for c in report["cases"] if not c["ok"]]
    assert code == 0 and not failed and not report["alive_problems"], (failed, report["alive_problems"])
    assert report["server_errors"] == 0 and report["kinds"] == len(CASES)
    assert report["rss_peak_mib"] - report["rss_start_mib"] < RSS_GROWTH_BOUND_MIB, report


def test_remote_targets_are_refused_without_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert hostile.main(["--url", "http://192.0.2.1:8000"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert (
        hostile.is_loopback("127.0.0.1") and hostile.is_loopback("[::1]") and hostile.is_loopback("localhost")
    )

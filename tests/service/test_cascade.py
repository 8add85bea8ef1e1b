"""The cascade: a second bundle decides the images the primary gate answers ``unknown``.

The second bundle is the tiny bundle with its CNN's output head rotated by one class (logit ``j`` of
the copy is logit ``j - 1`` of the original) and other normalisation statistics: a model that
disagrees with the primary, and whose inputs the server must re-normalise, built in a second from
the tiny bundle instead of another minute of training. Expected numbers come from the two gates run on the
same images, never from the service.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from models.bundle import CONDUCTANCE_FILE, MUTANTS_FILE, WEIGHTS_NAME, Bundle, load_bundle
from models.errors import ConfigError
from models.gate import Gate, GateOutput, load_gate
from models.mutation import MutantSet, mutant_weights_hash
from service.main import create_app
from service.settings import Settings
from service.state import load_service
from tests.service.conftest import make_settings, png_bytes

TOL = 1e-4
STRICT = "wrong-recall=0.995"  # the primary rejects many images at this point


def _rotate_head(bundle: Bundle) -> None:
    """Rotate the classifier's output rows by one class and re-record what depends on the weights."""
    k = len(bundle.class_names)
    state = bundle.read_tensors(WEIGHTS_NAME)
    head = [name for name, t in state.items() if name.endswith("weight") and t.ndim == 2 and t.shape[0] == k][
        -1
    ]
    for name in (head, head.removesuffix("weight") + "bias"):
        if name in state:
            state[name] = torch.roll(state[name], shifts=1, dims=0)
    bundle.write_tensors(WEIGHTS_NAME, state)
    if bundle.has_file(CONDUCTANCE_FILE):  # the shortcut's stored logits and head Jacobian, one row per class
        constants = bundle.read_tensors(CONDUCTANCE_FILE)
        for name in ("baseline_logits", "head_jacobian"):
            constants[name] = torch.roll(constants[name], shifts=1, dims=0)
        bundle.write_tensors(CONDUCTANCE_FILE, constants)
    if bundle.has_file(MUTANTS_FILE):  # mutants are regenerated from the weights: record their new hashes
        model = bundle.load_model("cpu")
        specs = MutantSet.from_dict(bundle.read_json(MUTANTS_FILE)).specs
        bundle.manifest["mutants"]["weight_hashes"] = [mutant_weights_hash(model, spec) for spec in specs]


def _copy(tiny_bundle: Path, folder: Path, name: str) -> Bundle:
    return load_bundle(tiny_bundle).copy_to(folder / name)


@pytest.fixture(scope="module")
def second_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle that disagrees with the tiny one everywhere and was normalised differently."""
    copy = _copy(tiny_bundle, tmp_path_factory.mktemp("cascade"), "rotated")
    _rotate_head(copy)
    norm = copy.manifest["normalisation"]
    copy.manifest["normalisation"] = {
        "mean": [m + 0.1 for m in norm["mean"]],
        "std": [s * 1.5 for s in norm["std"]],
    }
    copy.save()
    return copy.path


@pytest.fixture(scope="module")
def second_gate(second_bundle: Path) -> Gate:
    return load_gate(load_bundle(second_bundle), "cpu")


@pytest.fixture(scope="module")
def strict(gate: Gate, bundle: Bundle, sample_images: np.ndarray) -> str:
    """The primary's point that rejects the most of the first 24 sample images while still accepting
    at least two (``STRICT`` where it does): the batch then has primary accepts and cascade work. The
    tiny bundle's scores differ slightly between machines, so a fixed name could reject all 24."""
    x = bundle.normalisation.apply(sample_images[:24])
    scores = gate.run(x).unified_score
    chosen = gate.signal_set(None)
    usable = {
        name: int(op.reject(scores).sum())
        for name, op in chosen.operating_points.items()
        if 2 <= int((~op.reject(scores)).sum()) and op.reject(scores).sum() >= 4
    }
    assert usable, "no operating point of the primary both accepts and rejects enough sample images"
    return STRICT if STRICT in usable else max(usable, key=usable.__getitem__)


@pytest.fixture(scope="module")
def point(
    gate: Gate,
    bundle: Bundle,
    second_gate: Gate,
    second_bundle: Path,
    sample_images: np.ndarray,
    strict: str,
) -> str:
    """An operating point of the cascade's default set at which it accepts some of the primary's
    rejects among the first 24 sample images and rejects others: every branch is then exercised."""
    images = sample_images[:24]
    rejected = gate.run(bundle.normalisation.apply(images), operating_point=strict).reject
    scores = second_gate.run(load_bundle(second_bundle).normalisation.apply(images[rejected])).unified_score
    for chosen in sorted(second_gate.signal_set(None).operating_points.values(), key=lambda p: p.threshold):
        accepted = ~chosen.reject(scores)
        if accepted.any() and not accepted.all():
            return chosen.name
    raise AssertionError("no cascade operating point both accepts and rejects the primary's rejects")


def _settings(tiny_bundle: Path, second_bundle: Path, point: str, strict: str, **extra: Any) -> Settings:
    return make_settings(
        tiny_bundle,
        operating_point=strict,
        cascade_bundle=second_bundle,
        cascade_operating_point=point,
        warmup=False,
        **extra,
    )


@pytest.fixture(scope="module")
def cascade_client(tiny_bundle: Path, second_bundle: Path, point: str, strict: str) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tiny_bundle, second_bundle, point, strict))) as client:
        yield client


def _batch(client: TestClient, images: np.ndarray, **params: Any) -> list[dict[str, Any]]:
    files = [("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)]
    response = client.post("/predict/batch", files=files, params=params)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _expected(
    gate: Gate,
    bundle: Bundle,
    second_gate: Gate,
    second: Bundle,
    images: np.ndarray,
    point: str,
    strict: str,
) -> tuple[GateOutput, GateOutput]:
    primary = gate.run(bundle.normalisation.apply(images), operating_point=strict)
    cascade = second_gate.run(second.normalisation.apply(images), operating_point=point)
    return primary, cascade


def test_decided_by_and_the_cascade_answer(
    cascade_client: TestClient,
    gate: Gate,
    bundle: Bundle,
    second_gate: Gate,
    second_bundle: Path,
    sample_images: np.ndarray,
    point: str,
    strict: str,
) -> None:
    images = sample_images[:24]
    second = load_bundle(second_bundle)
    primary, cascade = _expected(gate, bundle, second_gate, second, images, point, strict)
    records = _batch(cascade_client, images, top_k=2)
    want = np.where(~primary.reject, "primary", np.where(~cascade.reject, "cascade", "none"))
    assert [r["decided_by"] for r in records] == want.tolist()
    assert {"primary", "cascade", "none"} == set(want.tolist())  # the batch exercises every path
    relabelled = [r for r in records if r["decided_by"] == "cascade" and r["label"] != r["primary_label"]]
    assert relabelled  # some cascade answers name another class than the primary's CNN
    names = bundle.class_names
    for i, record in enumerate(records):
        # the primary's evidence is kept whoever decided
        assert record["primary_label"] == int(primary.prediction[i])
        np.testing.assert_allclose(record["probabilities"], primary.probabilities[i], atol=TOL)
        assert record["unified_score"] == pytest.approx(float(primary.unified_score[i]), abs=TOL)
        assert (
            record["bundle_id"] == bundle.manifest["bundle_id"] and record["signal_set"] == primary.signal_set
        )
        if want[i] == "primary":
            assert record["cascade"] is None and record["verdict"] == "accept"
            assert record["label"] == int(primary.prediction[i])
            continue
        opinion = record["cascade"]
        assert opinion["bundle_id"] == second.manifest["bundle_id"]
        assert opinion["label"] == int(cascade.prediction[i])
        np.testing.assert_allclose(opinion["probabilities"], cascade.probabilities[i], atol=TOL)
        assert opinion["unified_score"] == pytest.approx(float(cascade.unified_score[i]), abs=TOL)
        assert opinion["verdict"] == ("unknown" if cascade.reject[i] else "accept")
        assert opinion["operating_point"]["name"] == point
        if want[i] == "cascade":  # the cascade's label, class and top classes; verdict accept
            assert record["verdict"] == "accept" and record["label"] == opinion["label"]
            assert record["class_name"] == names[opinion["label"]]
            top = np.argsort(-cascade.probabilities[i], kind="stable")[:2]
            assert [t["label"] for t in record["top_k"]] == top.tolist()
        else:  # rejected by both: unknown, with the primary's label
            assert record["verdict"] == "unknown" and record["label"] == record["primary_label"]


def test_decisions_are_counted_by_who_decided(cascade_client: TestClient, sample_images: np.ndarray) -> None:
    def counts() -> dict[str, float]:
        text = cascade_client.get("/metrics").text
        found = {}
        for who in ("primary", "cascade", "none"):
            line = next(
                (
                    ln
                    for ln in text.splitlines()
                    if ln.startswith(f'predgate_decisions_total{{decided_by="{who}"}}')
                ),
                None,
            )
            found[who] = float(line.split()[-1]) if line else 0.0
        return found

    before = counts()
    records = _batch(cascade_client, sample_images[24:36])
    after = counts()
    for who in ("primary", "cascade", "none"):
        assert after[who] - before[who] == sum(r["decided_by"] == who for r in records)


def test_only_images_unknown_after_the_cascade_reach_the_outbox(
    tiny_bundle: Path,
    second_bundle: Path,
    point: str,
    strict: str,
    sample_images: np.ndarray,
    tmp_path: Path,
) -> None:
    settings = _settings(
        tiny_bundle,
        second_bundle,
        point,
        strict,
        fallback_url="http://127.0.0.1:9/items",
        fallback_dir=tmp_path / "outbox",  # nobody listens: pending
    )
    with TestClient(create_app(settings)) as client:
        records = _batch(client, sample_images[:24])
        box = client.app.state.predgate.outbox  # type: ignore[attr-defined]
        assert {r["decided_by"] for r in records} >= {"cascade", "none"}
        for i, record in enumerate(records):
            assert (record["fallback_item"] is not None) == (record["decided_by"] == "none")
            if record["decided_by"] == "none":
                stored = box.item(record["fallback_item"])
                assert stored["meta"]["index"] == i
                assert stored["meta"]["prediction"]["cascade"]["verdict"] == "unknown"
        assert box.counts().pending == sum(r["decided_by"] == "none" for r in records)


def test_without_a_cascade_answers_are_unchanged_but_for_decided_by(
    app_client: Callable[..., TestClient], gate: Gate, bundle: Bundle, sample_images: np.ndarray
) -> None:
    images = sample_images[:16]
    out = gate.run(bundle.normalisation.apply(images), operating_point=STRICT)
    with app_client(operating_point=STRICT, warmup=False) as client:
        records = _batch(client, images)
        assert client.get("/v1/bundle").json()["cascade"] is None
    assert [r["decided_by"] for r in records] == ["none" if rej else "primary" for rej in out.reject]
    for i, record in enumerate(records):
        assert record["cascade"] is None and record["label"] == record["primary_label"] == int(
            out.prediction[i]
        )
        assert record["verdict"] == ("unknown" if out.reject[i] else "accept")


def test_bundle_route_names_the_cascade(
    cascade_client: TestClient, second_bundle: Path, second_gate: Gate, point: str
) -> None:
    summary = cascade_client.get("/v1/bundle").json()["cascade"]
    assert summary["bundle_id"] == load_bundle(second_bundle).manifest["bundle_id"]
    assert summary["signal_set"] == second_gate.default_set
    assert summary["operating_point"]["name"] == point


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda m: m.update(class_names=[*m["class_names"][1:], m["class_names"][0]]), "names other classes"),
        (lambda m: m.update(input_shape=[m["input_shape"][0], 32, 32]), "takes inputs of shape [1, 32, 32]"),
    ],
    ids=["class-names", "input-shape"],
)
def test_a_mismatched_cascade_bundle_stops_start_up(
    tiny_bundle: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None], says: str
) -> None:
    copy = _copy(tiny_bundle, tmp_path, "mismatched")
    edit(copy.manifest)
    copy.save()
    with pytest.raises(ConfigError, match="PREDGATE_CASCADE_BUNDLE") as refused:
        load_service(make_settings(tiny_bundle, cascade_bundle=copy.path))
    assert says in str(refused.value) and str(copy.path) in str(refused.value)


def test_cascade_names_are_checked_at_start_and_need_a_cascade(
    tiny_bundle: Path, second_bundle: Path
) -> None:
    with pytest.raises(ConfigError, match="cascade_operating_point"):
        load_service(make_settings(tiny_bundle, cascade_bundle=second_bundle, cascade_operating_point="nope"))
    with pytest.raises(ConfigError, match="cascade_signal_set 'nope'"):
        load_service(make_settings(tiny_bundle, cascade_bundle=second_bundle, cascade_signal_set="nope"))
    with pytest.raises(ValueError, match="PREDGATE_CASCADE_BUNDLE"):
        make_settings(tiny_bundle, cascade_operating_point=STRICT)

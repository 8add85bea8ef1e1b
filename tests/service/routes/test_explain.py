"""POST /explain, the explain option of /predict and /predict/batch, and the fallback item's explanation.

Expected explanations come from models.explanations.Explainer run here on the same normalised inputs,
expected verdicts from Gate.run: never from the service under test."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.bundle import Bundle
from models.explanations import METHODS, Explainer, Explanation
from models.gate import Gate
from tests.service.conftest import png_bytes


@pytest.fixture(scope="module")
def explainer(gate: Gate, bundle: Bundle) -> Explainer:
    return Explainer.from_gate(gate, bundle)


def expected(
    explainer: Explainer, bundle: Bundle, images: np.ndarray, method: str = "grad_cam", k: int = 5
) -> list[Explanation]:
    return explainer.explain(bundle.normalisation.apply(images), method, k)


def check(answer: dict[str, Any], want: Explanation, bundle: Bundle) -> None:
    names = bundle.class_names
    assert answer["method"] == want.method
    assert answer["target"] == {"label": want.target, "class_name": names[want.target]}
    assert answer["runner_up"] == {"label": want.runner_up, "class_name": names[want.runner_up]}
    for side, maps in (("predicted", want.predicted_maps), ("runner_up", want.runner_up_maps)):
        got = answer["top_feature_maps"][side]
        assert [m["channel"] for m in got] == [m.channel for m in maps]
        np.testing.assert_allclose(
            [m["conductance"] for m in got], [m.conductance for m in maps], rtol=1e-5, atol=1e-6
        )
        assert all(base64.b64decode(m["png"]).startswith(b"\x89PNG") for m in got)
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == Image.open(io.BytesIO(want.overlay_png)).size
    # same heat map, so the same picture (both rendered from float maps of the same passes)
    ours = np.asarray(Image.open(io.BytesIO(want.overlay_png))).astype(int)
    assert np.abs(np.asarray(overlay).astype(int) - ours).max() <= 2


def test_explain_a_png_and_a_tensor(
    client: TestClient, explainer: Explainer, bundle: Bundle, sample_images: np.ndarray
) -> None:
    image = sample_images[3:4]
    (want,) = expected(explainer, bundle, image)
    by_file = client.post("/explain", files={"file": ("x.png", png_bytes(image[0]), "image/png")})
    assert by_file.status_code == 200, by_file.text
    check(by_file.json(), want, bundle)
    assert by_file.json()["convergence_delta"] is None
    assert {"conductance", "attribution", "render", "total"} <= set(by_file.json()["timings_ms"])
    tensor = bundle.normalisation.apply(image)[0].tolist()
    by_tensor = client.post("/explain?top_k_maps=2", json={"tensor": tensor})
    assert by_tensor.status_code == 200, by_tensor.text
    (two,) = expected(explainer, bundle, image, k=2)
    check(by_tensor.json(), two, bundle)
    assert len(by_tensor.json()["top_feature_maps"]["runner_up"]) == 2


@pytest.mark.parametrize("method", METHODS)
def test_every_method(
    client: TestClient, explainer: Explainer, bundle: Bundle, sample_images: np.ndarray, method: str
) -> None:
    image = sample_images[5:6]
    (want,) = expected(explainer, bundle, image, method)
    response = client.post(
        f"/explain?method={method}", content=png_bytes(image[0]), headers={"content-type": "image/png"}
    )
    assert response.status_code == 200, response.text
    check(response.json(), want, bundle)
    assert (response.json()["convergence_delta"] is None) == (method != "integrated_gradients")


def test_bad_method_and_body_options_are_json_422s(client: TestClient, sample_images: np.ndarray) -> None:
    png = png_bytes(sample_images[0])
    bad = client.post("/explain?method=lime", files={"file": ("x.png", png, "image/png")})
    assert bad.status_code == 422
    error = bad.json()["error"]
    assert (
        error["type"] == "validation_error"
        and "method" in error["message"]
        and "grad_cam" in error["message"]
    )
    body_option = client.post("/explain", json={"image": base64.b64encode(png).decode(), "top_k": 2})
    assert body_option.status_code == 422 and "query parameters" in body_option.json()["error"]["message"]
    assert (
        client.post("/explain?top_k_maps=0", files={"file": ("x.png", png, "image/png")}).status_code == 422
    )
    late = client.post(
        "/explain", files={"file": ("x.png", png, "image/png")}, headers={"x-request-timeout": "1e-9"}
    )
    assert late.status_code == 504 and late.json()["error"]["type"] == "deadline_exceeded"
    bad_mode = client.post("/predict?explain=sometimes", files={"file": ("x.png", png, "image/png")})
    assert bad_mode.status_code == 422 and bad_mode.json()["error"]["type"] == "validation_error"


def test_explain_needs_the_api_key(app_client: Callable[..., TestClient], sample_images: np.ndarray) -> None:
    with app_client(api_key="k", warmup=False) as client:
        files = {"file": ("x.png", png_bytes(sample_images[0]), "image/png")}
        assert client.post("/explain", files=files).status_code == 401
        assert client.post("/explain", files=files, headers={"authorization": "Bearer k"}).status_code == 200


def test_predict_batch_explains_exactly_what_was_asked(
    app_client: Callable[..., TestClient],
    gate: Gate,
    explainer: Explainer,
    bundle: Bundle,
    sample_images: np.ndarray,
) -> None:
    images = sample_images[:16]
    out = gate.run(bundle.normalisation.apply(images))  # the bundle defaults, as the app below
    assert 0 < int(out.reject.sum()) < len(images)  # both verdicts, or the test proves nothing
    want = expected(explainer, bundle, images)
    files = [("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)]
    with app_client(warmup=False) as client:
        lean = client.post("/predict/batch", files=files).json()
        assert all(r["explanation"] is None for r in lean)  # the server's default: none
        unknown = client.post("/predict/batch?explain=unknown", files=files).json()
        assert [r["verdict"] == "unknown" for r in unknown] == out.reject.tolist()
        for i, record in enumerate(unknown):
            if out.reject[i]:
                check(record["explanation"], want[i], bundle)
            else:
                assert record["explanation"] is None
        every = client.post("/predict/batch", files=files, data={"explain": "all"}).json()
        for i, record in enumerate(every):
            check(record["explanation"], want[i], bundle)
        # the body value wins over the query's, as for every option
        tensor = bundle.normalisation.apply(images[:1])[0].tolist()
        one = client.post("/predict?explain=none", json={"tensor": tensor, "explain": "all"}).json()
        check(one["explanation"], want[0], bundle)
    with app_client(warmup=False, explain="unknown", explain_method="saliency") as client:
        by_setting = client.post("/predict/batch", files=files).json()
        assert [r["explanation"] is not None for r in by_setting] == out.reject.tolist()
        assert {r["explanation"]["method"] for r in by_setting if r["explanation"]} == {"saliency"}


def test_the_fallback_item_carries_the_explanation(
    app_client: Callable[..., TestClient],
    explainer: Explainer,
    bundle: Bundle,
    sample_images: np.ndarray,
    tmp_path: Path,
) -> None:
    images = sample_images[:16]
    want = expected(explainer, bundle, images)
    files = [("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)]
    settings = {
        "fallback_url": "http://127.0.0.1:9/items",  # nobody listens: items stay pending
        "warmup": False,
    }
    with app_client(fallback_dir=tmp_path / "on", **settings) as client:
        records = client.post("/predict/batch", files=files).json()
        unknown = [i for i, r in enumerate(records) if r["verdict"] == "unknown"]
        assert unknown and all(r["explanation"] is None for r in records)  # the answer stays lean
        box = client.app.state.predgate.outbox  # type: ignore[attr-defined]
        for i in unknown:
            meta = box.item(records[i]["fallback_item"])["meta"]
            check(meta["explanation"], want[i], bundle)
            assert meta["prediction"]["label"] == want[i].target and "explanation" not in meta["prediction"]
    with app_client(fallback_dir=tmp_path / "off", fallback_explain=False, **settings) as client:
        records = client.post("/predict/batch", files=files).json()
        box = client.app.state.predgate.outbox  # type: ignore[attr-defined]
        metas = [box.item(r["fallback_item"])["meta"] for r in records if r["verdict"] == "unknown"]
        assert metas and all("explanation" not in meta for meta in metas)

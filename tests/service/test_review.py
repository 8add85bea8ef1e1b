"""The review API on the tiny bundle: rejected inputs are listed, labelled, settled when the page is the
fallback, shown (tensors de-normalised), exported as Label Studio tasks, and guarded by the API key."""

from __future__ import annotations

import base64
import io
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import png_bytes

KEY = "review-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def reviewed(app_client: Any, sample_images: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A server with the review page and no fallback URL, after a batch with unknown answers."""
    settings = {
        "review": True,
        "fallback_dir": tmp_path_factory.mktemp("review") / "outbox",
        "operating_point": "wrong-recall=0.995",
        "api_key": KEY,
        "warmup": False,
    }
    with app_client(**settings) as client:
        files = [
            ("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(sample_images[:12])
        ]
        answer = client.post("/predict/batch", files=files, headers={**AUTH, "x-request-id": "rv-1"})
        assert answer.status_code == 200, answer.text
        yield client, answer.json()


def _unknown(records: list[dict[str, Any]]) -> list[int]:
    return [i for i, r in enumerate(records) if r["verdict"] == "unknown"]


def test_the_queue_lists_every_unknown_answer_oldest_first(reviewed: Any) -> None:
    client, records = reviewed
    queue = client.get("/review/items", headers=AUTH).json()
    unknown = _unknown(records)
    assert len(unknown) >= 2, "the test needs at least two rejected images"
    assert queue["waiting"] >= len(unknown)
    listed = {item["key"]: item for item in queue["items"]}
    for i in unknown:
        item = listed[records[i]["fallback_item"]]
        assert item["request_id"] == "rv-1" and item["prediction"]["label"] == records[i]["label"]
        assert item["delivery_state"] == "pending" and item["review"] is None
    assert queue["class_names"] == client.app.state.predgate.loaded.bundle.class_names


def test_a_label_is_stored_corrected_and_settles_the_item_when_the_page_is_the_fallback(
    reviewed: Any,
) -> None:
    client, records = reviewed
    key = records[_unknown(records)[0]]["fallback_item"]
    before = client.get("/review/items", headers=AUTH).json()["waiting"]
    answer = client.put(f"/review/items/{key}/label", json={"label": 3, "reviewer": "ana"}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    names = client.app.state.predgate.loaded.bundle.class_names
    assert answer.json()["review"]["label"] == 3 and answer.json()["review"]["class_name"] == names[3]
    assert answer.json()["delivery_state"] == "delivered"  # no fallback URL: the reviewer was the fallback
    queue = client.get("/review/items", headers=AUTH).json()
    assert queue["waiting"] == before - 1 and key not in {item["key"] for item in queue["items"]}
    # a second word replaces the first
    answer = client.put(f"/review/items/{key}/label", json={"none_of_these": True}, headers=AUTH)
    assert answer.json()["review"] == {
        **answer.json()["review"],
        "label": None,
        "class_name": "none of these",
    }
    stored = client.app.state.predgate.reviews.get(key)
    assert stored.label is None and stored.reviewed
    assert client.app.state.predgate.outbox.counts().delivered >= 1


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"label": 99}, 422),
        ({"label": -1}, 422),
        ({}, 422),
        ({"label": 1, "none_of_these": True}, 422),
        ({"label": "shirt"}, 422),
        ({"label": 1, "extra": 1}, 422),
    ],
)
def test_bad_labels_are_refused_with_a_json_error(reviewed: Any, body: dict[str, Any], status: int) -> None:
    client, records = reviewed
    key = records[_unknown(records)[-1]]["fallback_item"]
    answer = client.put(f"/review/items/{key}/label", json=body, headers=AUTH)
    assert answer.status_code == status and "error" in answer.json()
    assert client.app.state.predgate.reviews.get(key).reviewed is False


def test_unknown_keys_and_missing_credentials_are_4xx(reviewed: Any) -> None:
    client, _ = reviewed
    for path in ("/review/items/nope", "/review/items/nope/image"):
        assert client.get(path, headers=AUTH).status_code == 404
    assert client.put("/review/items/nope/label", json={"label": 1}, headers=AUTH).status_code == 404
    page = client.get("/review")
    assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic")
    assert client.get("/review", auth=("ana", "wrong")).status_code == 401
    assert client.get("/review", auth=("ana", KEY)).status_code == 200  # what a browser sends after asking


def test_the_page_shows_each_waiting_item_with_its_image_and_evidence(reviewed: Any) -> None:
    client, records = reviewed
    page = client.get("/review", auth=("ana", KEY))
    assert page.headers["content-type"].startswith("text/html")
    waiting = client.get("/review/items", headers=AUTH).json()["items"]
    for item in waiting:
        assert f'data-key="{item["key"]}"' in page.text and item["image_url"] in page.text
    image = client.get(waiting[0]["image_url"], headers=AUTH)
    assert image.headers["content-type"] == "image/png"
    index = next(i for i, r in enumerate(records) if r["fallback_item"] == waiting[0]["key"])
    assert image.content == client.app.state.predgate.outbox.item(records[index]["fallback_item"])["image"]


def test_a_tensor_input_is_shown_as_the_pixels_it_came_from(reviewed: Any, sample_images: np.ndarray) -> None:
    client, records = reviewed
    index = _unknown(records)[-1]
    loaded = client.app.state.predgate.loaded
    tensor = loaded.bundle.normalisation.apply(sample_images[index][None]).numpy()[0]
    answer = client.post("/predict", json={"tensor": tensor.tolist()}, headers=AUTH)
    assert answer.json()["verdict"] == "unknown"
    image = client.get(f"/review/items/{answer.json()['fallback_item']}/image", headers=AUTH)
    assert image.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(image.content)))
    assert np.array_equal(pixels, sample_images[index][..., 0])  # float32 round trip, rounded: exact


def test_reviewed_items_export_as_label_studio_tasks(reviewed: Any) -> None:
    client, records = reviewed
    names = client.app.state.predgate.loaded.bundle.class_names
    key = records[_unknown(records)[1]]["fallback_item"]
    client.put(f"/review/items/{key}/label", json={"label": 0}, headers=AUTH)
    tasks = client.get("/review/export", headers=AUTH).json()
    by_key = {t["data"]["predgate_key"]: t for t in tasks}
    exported = by_key[key]
    assert exported["annotations"][0]["result"][0]["value"] == {"choices": [names[0]]}
    assert exported["predictions"][0]["result"][0]["value"]["choices"] == [
        names[records[_unknown(records)[1]]["label"]]
    ]
    head, data = exported["data"]["image"].split(",", 1)
    assert head == "data:image/png;base64" and base64.b64decode(data).startswith(b"\x89PNG")
    # every choice the tasks use exists in the labelling config, under the names the results use
    config = ET.fromstring(client.get("/review/export/label-config", headers=AUTH).text)
    choices = config.find("Choices")
    assert choices is not None and choices.get("name") == "choice" and choices.get("toName") == "image"
    values = {c.get("value") for c in choices.findall("Choice")}
    used = {
        r["value"]["choices"][0]
        for t in tasks
        for part in ("annotations", "predictions")
        for r in t[part][0]["result"]
    }
    assert used <= values and values == {*names, "none of these"}


def test_the_review_page_is_off_unless_asked_for(client: Any) -> None:
    answer = client.get("/review/items")
    assert answer.status_code == 404 and "PREDGATE_REVIEW" in answer.json()["error"]["message"]


def test_outbox_and_reviews_survive_a_restart(
    app_client: Any, sample_images: np.ndarray, tmp_path: Path
) -> None:
    settings = {
        "review": True,
        "fallback_dir": tmp_path / "o",
        "operating_point": "wrong-recall=0.995",
        "warmup": False,
    }
    with app_client(**settings) as client:
        files = [
            ("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(sample_images[:6])
        ]
        records = client.post("/predict/batch", files=files).json()
        key = records[_unknown(records)[0]]["fallback_item"]
        client.put(f"/review/items/{key}/label", json={"label": 2})
    with app_client(**settings) as client:
        assert client.get(f"/review/items/{key}").json()["review"]["label"] == 2


def test_the_estimate_counts_reviewed_rejections_the_cnn_had_wrong(tmp_path: Path) -> None:
    from scipy.stats import binomtest

    from service.fallback.outbox import NewItem, Outbox
    from service.fallback.reviews import ReviewStore

    box = Outbox(tmp_path / "o")
    store = ReviewStore(box)
    assert store.estimate().wrong_rate is None and store.estimate().reviewed == 0
    predicted = [1, 1, 2, 3, 4, 5, 6]
    keys = box.enqueue([NewItem({"prediction": {"label": p}}, b"x", "image/png") for p in predicted])
    truth = [1, 0, 2, None, 4, 9, None]  # right, wrong, right, none of these, right, wrong, none of these
    for key, label in zip(keys, truth, strict=True):
        store.record(key, label, None, settle=False)
    estimate = store.estimate()
    assert (estimate.reviewed, estimate.wrong, estimate.none_of_these) == (7, 4, 2)
    assert estimate.wrong_rate == pytest.approx(4 / 7)
    exact = binomtest(4, 7).proportion_ci(confidence_level=0.95, method="exact")
    assert (estimate.wrong_rate_low, estimate.wrong_rate_high) == pytest.approx((exact.low, exact.high))
    store.record(keys[0], 7, None, settle=False)  # a correction counts once, with the latest label
    assert store.estimate().wrong == 5 and store.estimate().reviewed == 7
    assert box.counts().pending == 7  # settle=False: a fallback URL still owes delivery
    box.close()

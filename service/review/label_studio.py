"""Reviewed items as Label Studio tasks (its "Basic Label Studio JSON format" for import).

A team that labels in Label Studio can import predgate's reviews as annotated tasks, with the CNN's
prediction as a pre-annotation, and keep labelling there. The labelling config that matches the tasks
(an ``Image`` named ``image`` and single-choice ``Choices`` named ``choice``, one ``Choice`` per class
plus "none of these") comes with the export, because tasks only import into a project whose config
names the same fields.
"""

from __future__ import annotations

import base64
from typing import Any
from xml.sax.saxutils import quoteattr

from service.fallback.reviews import StoredItem

NONE_OF_THESE = "none of these"
FROM_NAME, TO_NAME = "choice", "image"


def labelling_config(class_names: list[str]) -> str:
    """The Label Studio project config the exported tasks fit."""
    choices = "".join(f"\n    <Choice value={quoteattr(name)}/>" for name in [*class_names, NONE_OF_THESE])
    return (
        '<View>\n  <Image name="image" value="$image"/>\n'
        f'  <Choices name="choice" toName="image" choice="single">{choices}\n  </Choices>\n</View>\n'
    )


def _choice(value: str) -> list[dict[str, Any]]:
    return [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [value]}}]


def task(item: StoredItem, image: bytes, media_type: str, class_names: list[str]) -> dict[str, Any]:
    """One reviewed item as a task: the image inline (a data URL), the reviewer's label as an annotation,
    the CNN's top class as a prediction scored by its probability."""
    prediction = item.meta.get("prediction", {})
    label = NONE_OF_THESE if item.label is None else class_names[item.label]
    predicted = int(prediction.get("label", -1))
    probabilities = prediction.get("probabilities") or []
    result: dict[str, Any] = {
        "data": {
            "image": f"data:{media_type};base64,{base64.b64encode(image).decode('ascii')}",
            "predgate_key": item.key,
            "request_id": item.meta.get("request_id"),
            "bundle_id": item.meta.get("bundle_id"),
            "verdict": prediction.get("verdict"),
            "unified_score": prediction.get("unified_score"),
        },
        "annotations": [{"result": _choice(label), "was_cancelled": False, "ground_truth": False}],
    }
    if 0 <= predicted < len(class_names):
        result["predictions"] = [
            {
                "model_version": str(item.meta.get("bundle_id")),
                "score": float(probabilities[predicted]) if predicted < len(probabilities) else None,
                "result": _choice(class_names[predicted]),
            }
        ]
    return result

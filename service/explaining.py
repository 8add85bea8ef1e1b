"""Explanations in the service: computed on a worker thread, turned into the response model there.

The computation (:mod:`models.explanations`) runs backward passes through the CNN, tens of
milliseconds per image on a CPU: it must never run on the event loop, where it would stall every
other request. The base64 encoding of the PNGs happens on the same thread for the same reason.
"""

from __future__ import annotations

import base64

import torch
from starlette.concurrency import run_in_threadpool

from models.errors import ConfigError
from models.explanations import Explainer
from models.explanations import Explanation as Found
from models.explanations import FeatureMap as FoundMap
from service.schemas import ClassRef, Explanation, FeatureMap, TopFeatureMaps
from service.state import LoadedService


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _maps(maps: list[FoundMap]) -> list[FeatureMap]:
    return [
        FeatureMap(
            channel=m.channel, conductance=m.conductance, png=_b64(m.png) if m.png is not None else None
        )
        for m in maps
    ]


def to_schema(found: Found, class_names: list[str]) -> Explanation:
    """The response model of one image's explanation (PNGs as base64, classes with their names)."""
    return Explanation(
        method=found.method,  # type: ignore[arg-type]  # one of METHODS, checked by the explainer
        target=ClassRef(label=found.target, class_name=class_names[found.target]),
        runner_up=ClassRef(label=found.runner_up, class_name=class_names[found.runner_up]),
        overlay_png=_b64(found.overlay_png),
        top_feature_maps=TopFeatureMaps(
            predicted=_maps(found.predicted_maps), runner_up=_maps(found.runner_up_maps)
        ),
        convergence_delta=found.convergence_delta,
        timings_ms={stage: 1000.0 * seconds for stage, seconds in found.seconds.items()},
    )


def _explain(
    explainer: Explainer, x: torch.Tensor, method: str, top_k: int, names: list[str]
) -> list[Explanation]:
    return [to_schema(found, names) for found in explainer.explain(x, method, top_k)]


async def explain_images(
    loaded: LoadedService, x: torch.Tensor, method: str, top_k: int
) -> list[Explanation]:
    """One explanation per row of ``x`` (``N x C x H x W``, normalised), computed off the event loop."""
    if loaded.explainer is None:
        raise ConfigError("explanations need the gate's conductance layer, and this bundle's gate has none")
    return await run_in_threadpool(_explain, loaded.explainer, x, method, top_k, loaded.bundle.class_names)

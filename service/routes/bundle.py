"""``GET /v1/bundle``: what the server serves, from the bundle's manifest and the running settings."""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter

from service.deps import LoadedDep, SettingsDep, StateDep
from service.schemas import BundleSummary, CascadeSummary, OperatingPointRef, SignalSetSummary
from service.settings import Settings
from service.state import LoadedService

router = APIRouter(tags=["bundle"])


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity (a val risk is NaN when nothing is accepted): send null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _scalars(section: Any) -> dict[str, Any] | None:
    """The scalar entries of a manifest section (drops long lists such as weight hashes and histories)."""
    if not isinstance(section, dict):
        return None
    return _finite({k: v for k, v in section.items() if not isinstance(v, list | dict)})


@router.get(
    "/v1/bundle", response_model=BundleSummary, summary="Manifest summary, signal sets, operating points"
)
async def bundle_summary(loaded: LoadedDep, settings: SettingsDep, state: StateDep) -> BundleSummary:
    """Built on the first call and kept: the bundle and the settings do not change while serving."""
    if state.bundle_summary is None:
        state.bundle_summary = build_summary(loaded, settings)
    return state.bundle_summary


def build_summary(loaded: LoadedService, settings: Settings) -> BundleSummary:
    """The summary of what ``loaded`` serves under ``settings``."""
    manifest = loaded.bundle.manifest
    detectors = loaded.bundle.detectors
    assert detectors is not None  # a gate loads only from a bundle with detectors
    serving = loaded.gate.signal_set(None)
    sets = []
    for name, info in detectors.signal_sets.items():
        details = {
            k: v
            for k, v in info.to_dict().items()
            if k not in ("signals", "operating_points", "default_point", "stem")
        }
        sets.append(
            SignalSetSummary(
                name=name,
                signals=list(info.signals),
                is_default=name == detectors.default_set,
                serving=name == serving.name,
                default_point=info.default_point,
                operating_points=_finite(info.operating_points),
                details=_finite(details),
            )
        )
    training = manifest.get("training")
    training_summary = None
    if isinstance(training, dict):
        training_summary = _finite({k: v for k, v in training.items() if "accuracy" in k or k == "device"})
    evidence = detectors.details.get("evidence_value", manifest.get("evidence_value"))
    return BundleSummary(
        bundle_id=loaded.bundle_id,
        dataset=_scalars(manifest.get("dataset")) or {},
        class_names=loaded.bundle.class_names,
        input_shape=list(loaded.bundle.input_shape),
        architecture=_scalars(manifest.get("architecture")) or {},
        conductance={
            **(_scalars(manifest.get("conductance")) or {}),
            "detector_inputs": loaded.gate.cond_inputs,
        },
        training=training_summary,
        mutants=_scalars(manifest.get("mutants")),
        default_set=detectors.default_set,
        serving={
            "signal_set": serving.name,
            "operating_point": serving.point(settings.operating_point).name,
            "device": str(loaded.device),
            "resize": settings.resize,
            "input_shape": list(loaded.contract.shape),
            "max_batch_size": settings.max_batch_size,
            "max_images_per_request": settings.max_images_per_request,
        },
        signal_sets=sets,
        evidence_value=_finite(evidence) if isinstance(evidence, list) else None,
        cascade=_cascade_summary(loaded),
    )


def _cascade_summary(loaded: LoadedService) -> CascadeSummary | None:
    """The second bundle deciding the primary's unknowns, with the set and point it decides at."""
    cascade = loaded.cascade
    if cascade is None:
        return None
    point = cascade.gate.signal_set(cascade.signal_set).point(cascade.operating_point)
    return CascadeSummary(
        bundle_id=cascade.bundle_id,
        architecture=_scalars(cascade.bundle.manifest.get("architecture")) or {},
        signal_set=cascade.signal_set,
        operating_point=OperatingPointRef(name=point.name, threshold=point.threshold),
        device=str(loaded.device),
    )

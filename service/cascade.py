"""The cascade: a second bundle that decides the inputs the primary gate answers ``unknown``.

Like an InferenceGraph switch step or a confidence-exit cascade, most inputs are answered by the
first (cheaper) model and only its rejects pay for the second one. The second bundle has its own
CNN, detectors and operating point; it must take the same input (shape, channels) and name the same
classes in the same order as the primary, or a cascade answer would mean another class than the
primary's label with the same index. Both are checked when the server starts, with a message that
says which setting to change.

Requests are parsed and normalised once, with the primary's statistics; :meth:`Cascade.inputs`
re-normalises them with the cascade bundle's own mean and std (an affine map per channel), so a
second model trained on other statistics sees what its build saw.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from models.bundle import Bundle, load_bundle
from models.errors import ConfigError
from models.gate import Gate, GatePlan, load_gate


@dataclass
class Cascade:
    """The loaded second bundle, its gate, and the fixed signal set / operating point it decides with.

    Requests cannot choose the cascade's signal set or point: their names belong to the primary.
    """

    bundle: Bundle
    gate: Gate
    signal_set: str
    operating_point: str
    _scale: torch.Tensor
    _shift: torch.Tensor

    @property
    def bundle_id(self) -> str:
        return str(self.bundle.manifest["bundle_id"])

    @functools.cached_property
    def plan(self) -> GatePlan:
        """What the cascade's batcher groups by: always the configured set and point, only what the set
        needs (a client's ``full_evidence`` asks for the primary's evidence, not for a second LCR)."""
        return self.gate.plan(self.signal_set, self.operating_point)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``N x C x H x W`` normalised for the primary -> the same images normalised for the cascade."""
        return x * self._scale + self._shift


def check_compatible(primary: Bundle, second: Bundle, path: Path) -> None:
    """Refuse a second bundle whose answers could not stand in for the primary's.

    Raises
    ------
    ConfigError
        Input shapes or class names differ (same count, other order included).
    """
    if tuple(second.input_shape) != tuple(primary.input_shape):
        raise ConfigError(
            f"cascade_bundle {path} takes inputs of shape {list(second.input_shape)} (C x H x W), the "
            f"primary bundle {list(primary.input_shape)}: build the cascade bundle for the same input "
            "(--image-size / --channels) or set PREDGATE_CASCADE_BUNDLE to one that matches"
        )
    if second.class_names != primary.class_names:
        differing = [
            f"{i}: {a!r} vs {b!r}"
            for i, (a, b) in enumerate(zip(primary.class_names, second.class_names, strict=False))
            if a != b
        ]
        detail = (
            f"{len(primary.class_names)} vs {len(second.class_names)} classes"
            if len(primary.class_names) != len(second.class_names)
            else "labels " + ", ".join(differing[:5])
        )
        raise ConfigError(
            f"cascade_bundle {path} names other classes than the primary bundle ({detail}; primary vs "
            "cascade): a cascade answer's label would mean another class. Build both bundles on the same "
            "data set with the same class order, or set PREDGATE_CASCADE_BUNDLE to one that matches"
        )


def load_cascade(
    path: Path,
    primary: Bundle,
    device: torch.device,
    signal_set: str | None,
    operating_point: str | None,
    backend: str,
) -> Cascade:
    """Load and check the second bundle the way the primary is loaded.

    Raises
    ------
    BundleError
        The cascade bundle is missing, incomplete, tampered with or has no detectors.
    ConfigError
        Its inputs or classes differ from the primary's, or ``cascade_signal_set`` /
        ``cascade_operating_point`` name something it does not store.
    """
    second = load_bundle(path)
    check_compatible(primary, second, path)
    sets = second.detectors.signal_sets if second.detectors is not None else {}
    if signal_set is not None and sets and signal_set not in sets:
        raise ConfigError(
            f"cascade_signal_set {signal_set!r} is not in the cascade bundle {path}; stored: {sorted(sets)}"
        )
    gate = load_gate(second, device, signal_set, backend=backend)
    chosen = gate.signal_set(None)
    try:
        point = chosen.point(operating_point)
    except ConfigError as exc:
        raise ConfigError(f"cascade_operating_point: {exc} (cascade bundle {path})") from None
    p, c = primary.normalisation, second.normalisation
    channels = primary.input_shape[0]
    p_mean, p_std, c_mean, c_std = (
        torch.tensor(v, dtype=torch.float32).expand(channels).reshape(1, -1, 1, 1)
        for v in (p.mean, p.std, c.mean, c.std)
    )
    # x_p = (raw - p_mean) / p_std and x_c = (raw - c_mean) / c_std, so x_c = x_p * scale + shift
    scale = p_std / c_std
    shift = (p_mean - c_mean) / c_std
    return Cascade(second, gate, chosen.name, point.name, scale, shift)

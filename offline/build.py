"""``predgate build``: every stage into one bundle, resumable, with one progress line per stage."""

from __future__ import annotations

import time
from pathlib import Path

from models.bundle import MANIFEST_NAME, Bundle, load_bundle
from models.data import DataSource
from models.errors import BundleError, ConfigError
from offline.open_world import fit_default_set
from offline.profiles import STAGE_ORDER, BuildProfile
from offline.ray_engine import RayEngine
from offline.report import write_report
from offline.stages import (
    ModelRequest,
    accuracy_check,
    conductance_stage,
    detectors_stage,
    features_stage,
    mutants_stage,
    prepare,
    train_stage,
)

__all__ = ["STAGE_ORDER", "build_bundle"]

DEFAULT_SET_STAGE = "detectors:default-set"
"""Marks the open-world default set as fitted; a part of the detectors stage, so ``--redo detectors``
(or an earlier stage) fits it again."""


def _say(message: str) -> None:
    print(f"[predgate build] {message}", flush=True)


def apply_default_set(bundle: Bundle, chosen: str | None, *, seed: int, progress: bool) -> None:
    """Make ``chosen`` the bundle's default signal set once its detectors exist.

    A build set (``cond+lcr``) only needs the manifest's choice; an open-world set (``VARIANT/SET``)
    is fitted first (:func:`offline.open_world.fit_default_set`). A bundle built with another
    default (e.g. before the profile's default changed) gets the new one and a new report, without
    touching any earlier stage; None keeps what the bundle has."""
    detectors = bundle.get("detectors") or {}
    if chosen is None:
        return
    if "/" in chosen:
        info = bundle.manifest.get("stages", {}).get(DEFAULT_SET_STAGE) or {}
        if info.get("set") == chosen and detectors.get("default_set") == info.get("served_as"):
            return
        _say(f"default set: {chosen} (open-set scorers and its detectors, fitted on this bundle's splits)")
        served = fit_default_set(bundle, chosen, seed=seed, progress=progress)
        bundle.mark_stage(DEFAULT_SET_STAGE, set=chosen, served_as=served)
        _say(f"default signal set: {served}")
    elif detectors.get("default_set") != chosen:
        if chosen not in detectors.get("signal_sets", {}):
            stored = sorted(detectors.get("signal_sets", {}))
            raise ConfigError(f"default signal set {chosen!r} is not in the bundle; stored: {stored}")
        bundle.set("detectors", {**detectors, "default_set": chosen})
        _say(f"default signal set: {chosen}")
    else:
        return
    bundle.manifest.get("stages", {}).pop("report", None)  # the report describes the default set
    bundle.save()


def derive_from(base: Path, out: Path) -> bool:
    """Start ``out`` as a copy of ``base`` (its own id, ``derived_from`` naming the base); True when it
    copied. An ``out`` copied from ``base`` earlier is kept (a variant build resumes); any other is refused.
    Only ids are read here: :meth:`Bundle.copy_to` verifies the base's files, and the caller opens ``out``."""
    base_bundle = load_bundle(base, verify=False)
    if not (Path(out) / MANIFEST_NAME).exists():
        base_bundle.copy_to(out)
        return True
    if load_bundle(out, verify=False).manifest.get("derived_from") != base_bundle.manifest["bundle_id"]:
        raise BundleError(f"{out} exists and was not copied from {base}: use another --out")
    return False


def build_bundle(
    out: Path,
    source: DataSource,
    profile: BuildProfile,
    *,
    arch: str = "resnet20",
    layer: str | None = None,
    weights: Path | None = None,
    device: str = "auto",
    default_set: str | None = None,
    overwrite: bool = False,
    redo: str | None = None,
    base: Path | None = None,
    progress: bool = True,
    model: ModelRequest | None = None,
    engine: RayEngine | None = None,
) -> Bundle:
    """Run the stages that are not done yet (and ``redo`` with every later one); returns the bundle.

    ``base``: start ``out`` as a copy of that bundle (its own id; see :meth:`Bundle.copy_to`), so a
    variant recomputes only the ``redo`` stage and the ones after it. ``model``: the model and its
    preprocessing (:class:`ModelRequest`); it replaces ``arch``, ``layer`` and ``weights`` when given.
    ``engine``: extract the features on Ray (:mod:`offline.ray_engine`) instead of in this process.
    Between training and the mutants the CNN's accuracy is checked (:func:`accuracy_check`)."""
    request = model or ModelRequest(arch=arch, layer=layer, weights=weights)
    t0 = time.perf_counter()
    if base is not None and derive_from(base, out):
        _say(f"copied {base} to {out}")

    def stage(name: str) -> float:
        _say(f"{name} ... (t={time.perf_counter() - t0:.0f}s)")
        return time.perf_counter()

    stage("prepare: data and splits")
    bundle, arrays = prepare(out, source, profile, overwrite=overwrite, redo=redo, model=request)
    pre = bundle.preprocessing
    if pre is not None:
        _say(
            f"model: {bundle.model_spec.name} on {'x'.join(map(str, pre.input_shape))} inputs (size from "
            f"{pre.sources.get('input_size')}, channels from {pre.sources.get('channels')}), mean "
            f"{[round(v, 4) for v in pre.mean]} std {[round(v, 4) for v in pre.std]} (from "
            f"{pre.sources.get('mean')}); conductance layer {bundle.manifest['conductance']['layer']!r}"
            + (
                f" ({bundle.manifest['conductance']['layer_chosen_by']})"
                if "layer_chosen_by" in bundle.manifest["conductance"]
                else ""
            )
        )
    if redo is not None:
        later = STAGE_ORDER[STAGE_ORDER.index(redo) :]
        for name in list(bundle.manifest["stages"]):
            if name.split(":")[0] in later:
                del bundle.manifest["stages"][name]
        bundle.save()
    _say("splits: " + ", ".join(f"{k} {len(v)}" for k, v in arrays.items()))
    weights = request.weights
    if weights is not None and pre is not None and pre.sources.get("mean") == "the cnn-train statistics":
        _say(
            "WARNING: the imported model's inputs are normalised with predgate's cnn-train statistics; pass "
            "--mean/--std if it was trained with others (the accuracy check below tries the usual ones)"
        )
    stage(
        f"train: {profile.epochs} epochs ({profile.optimizer})"
        if weights is None
        else f"train: importing {weights}"
    )
    train_stage(
        bundle,
        arrays,
        epochs=profile.epochs,
        seed=profile.seed,
        batch_size=profile.batch_size,
        weights=weights,
        device=device,
        progress=progress,
        profile=profile,
    )
    info = bundle.manifest["training"]
    _say(f"CNN accuracy: val {info['val_accuracy']:.4f}, test {info['test_accuracy']:.4f}")
    check = accuracy_check(
        bundle, arrays, expected=request.expected_accuracy, allow_low=request.allow_low_accuracy
    )
    for message in check.messages:
        _say(f"WARNING: {message}")
    stage("conductance: shortcut proof")
    conductance_stage(bundle, arrays)
    _say(f"conductance mode: {bundle.manifest['conductance']['mode']}")
    stage(f"mutants: {profile.n_mutants} x {profile.operator}@{profile.mutation_rate}")
    mutants_stage(
        bundle,
        arrays,
        operator=profile.operator,
        rate=profile.mutation_rate,
        n_mutants=profile.n_mutants,
        seed=profile.seed,
        modules=profile.mutant_modules,
        progress=progress,
    )
    mut = bundle.manifest["mutants"]
    _say(f"mutants kept: {mut['count']} of {mut['attempts']} tried")
    stage("features: fit, val, test")
    features_stage(
        bundle,
        arrays,
        early_stopping_alpha=profile.lcr_sprt_alpha,
        early_stopping_chunk=profile.lcr_chunk,
        progress=progress,
        engine=engine,
    )
    chosen = default_set or profile.default_set
    open_world_default = chosen is not None and "/" in chosen  # VARIANT/SET: an open-world set
    stage(f"detectors: {profile.detector_seeds} seeds")
    detectors_stage(
        bundle,
        seeds=profile.detector_seeds,
        default_set=None if open_world_default else chosen,
        cond_inputs=profile.cond_inputs,
        progress=progress,
    )
    apply_default_set(bundle, chosen, seed=profile.seed, progress=progress)
    stage("report")
    if not bundle.stage_done("report"):
        write_report(bundle, val_images=arrays["val"].images, n_boot=profile.n_boot, progress=progress)
    _say(f"done in {time.perf_counter() - t0:.0f}s: {bundle.path}")
    return bundle

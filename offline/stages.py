"""The build stages, each adding its part to one bundle and marking itself done.

A stage that is already marked done in the manifest is skipped, so an interrupted build continues
where it stopped (``predgate build`` with the same ``--out``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.architectures import default_layer
from models.bundle import (
    CONDUCTANCE_FILE,
    FEATURE_SPLITS,
    MANIFEST_NAME,
    MUTANTS_FILE,
    SCORES_FILE,
    Bundle,
    ConductanceDetectorInfo,
    DetectorsSection,
    SignalSetInfo,
    load_bundle,
    load_features,
    scores_key,
    signal_set_stem,
)
from models.conductance import ShortcutConductance, verify_shortcut
from models.data import DataSource, ImageArrays, SplitSpec, apply_splits, load_splits, make_splits
from models.detectors import save_state
from models.devices import resolve_device
from models.errors import BundleError, ConfigError
from models.gate import load_extractor
from models.metrics import wrong_labels
from models.mutant_search import generate_mutants
from models.mutation import mutant_weights_hash
from models.operating_points import choose_threshold
from models.preprocess import Normalisation
from models.sequential_lcr import EarlyStopping, sprt_from_data
from models.signals import PAPER_SET
from offline.features import apply_early_stopping, extract_features
from offline.fit import fit_detectors
from offline.profiles import STAGE_ORDER, BuildProfile, fixed_fields_differ
from offline.train import TrainConfig, accuracy, build_seeded_model, train_model

log = logging.getLogger("predgate.build")

# Per-dataset training recipe: flips and crops for natural images only.
AUGMENTATION = {"fashion-mnist": (False, 0), "cifar10": (True, 4), "imagefolder": (True, 4)}


def prepare(
    out: Path,
    source: DataSource,
    profile: BuildProfile,
    *,
    arch: str = "resnet20",
    layer: str | None = None,
    overwrite: bool = False,
    redo: str | None = None,
) -> tuple[Bundle, dict[str, ImageArrays]]:
    """Create the bundle (or reopen it), cut the splits and record normalisation statistics.

    Reopening needs the profile it was started with, except for the fields of the ``redo`` stage
    and later ones, which are recomputed: the new profile is then recorded."""
    manifest_path = Path(out) / MANIFEST_NAME
    if manifest_path.exists() and not overwrite:
        bundle = load_bundle(out)
        # Fields added to profiles after the bundle was started count at their defaults.
        recorded = BuildProfile(**(bundle.manifest.get("profile") or {}))
        differ = fixed_fields_differ(recorded, profile, redo)
        if differ:
            raise BundleError(
                f"{out} was started with {', '.join(f'{k}={getattr(recorded, k)!r}' for k in differ)}, not "
                f"{', '.join(f'{k}={getattr(profile, k)!r}' for k in differ)}: use another --out, --overwrite, "
                "or --redo an earlier stage"
            )
        recorded_layer = (bundle.manifest.get("conductance") or {}).get("layer")
        if layer is not None and layer != recorded_layer:
            if redo is None or STAGE_ORDER.index(redo) > STAGE_ORDER.index("conductance"):
                raise BundleError(
                    f"{out} computes conductance at {recorded_layer!r}, not {layer!r}: "
                    "use --redo conductance (or an earlier stage) to change the layer"
                )
            bundle.set("conductance", {"layer": layer})
            bundle.save()
        if recorded != profile:
            bundle.set("profile", profile.to_dict())
            bundle.save()
        return bundle, load_splits(bundle)
    train_pool, test_pool = source.load()
    spec = SplitSpec(
        cnn_train=profile.cnn_train,
        fit=profile.fit,
        val=profile.val,
        test=profile.test,
        seed=profile.seed,
        fit_is_cnn_train=profile.fit_is_cnn_train,
        val_from=profile.val_from,  # type: ignore[arg-type]
    )
    splits = make_splits(len(train_pool), len(test_pool), spec)
    arrays = apply_splits(train_pool, test_pool, splits)
    normalisation = Normalisation.from_images(arrays["cnn-train"].images)
    h, w, c = arrays["cnn-train"].image_shape
    bundle = Bundle.create(
        out,
        dataset={"name": source.name, "source": source.to_dict()},
        class_names=train_pool.class_names,
        input_shape=(c, h, w),
        normalisation=normalisation,
        architecture={"name": arch, "num_classes": len(train_pool.class_names), "in_channels": c},
        overwrite=overwrite,
    )
    bundle.set("profile", profile.to_dict())
    bundle.set("splits", splits.to_dict())
    bundle.set("conductance", {"layer": layer or default_layer(arch)})
    bundle.mark_stage("prepare")
    return bundle, arrays


def train_stage(
    bundle: Bundle,
    arrays: dict[str, ImageArrays],
    *,
    epochs: int,
    seed: int = 0,
    batch_size: int = 128,
    resume: bool = True,
    weights: Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> None:
    """Train the CNN on cnn-train (or import given weights) and record its accuracies."""
    if bundle.stage_done("train"):
        return
    arch = bundle.manifest["architecture"]
    model = build_seeded_model(arch["name"], arch["num_classes"], arch["in_channels"], seed)
    normalisation = bundle.normalisation
    flip, padding = AUGMENTATION.get(bundle.manifest["dataset"]["name"], (False, 0))
    config = TrainConfig(epochs=epochs, batch_size=batch_size, flip=flip, crop_padding=padding, seed=seed)
    torch_device = resolve_device(device)
    info: dict[str, Any] = {"device": str(torch_device)}
    if weights is not None:
        if Path(weights).suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.eval()
        info["imported_weights"] = str(Path(weights).name)
    else:
        result = train_model(
            model,
            arrays["cnn-train"],
            normalisation,
            config,
            val=arrays["val"],
            checkpoint=bundle.path / ".work" / "checkpoint.pt",
            resume=resume,
            device=torch_device,
            progress=progress,
        )
        info.update(config=config.to_dict(), history=result.history, wall_seconds=result.wall_seconds)
    model.to("cpu").eval()
    start = time.perf_counter()
    for split in ("cnn-train", "val", "test"):
        x = normalisation.apply(arrays[split].images)
        info[f"{split}_accuracy"] = accuracy(model, x, torch.from_numpy(arrays[split].labels))
    info["eval_seconds"] = time.perf_counter() - start
    bundle.save_model(model)
    bundle.set("training", info)
    bundle.mark_stage("train")


# ------------------------------------------------------------------------------ conductance
def conductance_stage(
    bundle: Bundle, arrays: dict[str, ImageArrays], *, n_steps: int = 10, rule: str = "left", n_check: int = 64
) -> None:
    """Decide between the exact shortcut and the general form, proving the shortcut on val images."""
    if bundle.stage_done("conductance"):
        return
    model = bundle.load_model()
    layer = bundle.manifest["conductance"]["layer"]
    samples = bundle.normalisation.apply(arrays["val"].images[:n_check])
    info: dict[str, Any] = {"layer": layer, "n_steps": n_steps, "rule": rule, "baseline": "zeros"}
    try:
        shortcut = ShortcutConductance.from_model(model, layer, bundle.input_shape, samples=samples, n_steps=n_steps)
    except ConfigError as exc:
        check = verify_shortcut(model, layer, samples, n_steps=n_steps)
        info.update(mode="general", shortcut_refused=str(exc), shortcut_max_rel_diff=check.max_rel_diff)
    else:
        assert shortcut.check_ is not None
        bundle.write_tensors(CONDUCTANCE_FILE, shortcut.state_dict())
        info.update(mode="shortcut", shortcut_max_rel_diff=shortcut.check_.max_rel_diff, shortcut_samples=n_check)
    bundle.set("conductance", info)
    bundle.mark_stage("conductance", mode=info["mode"])


# ------------------------------------------------------------------------------ mutants
def mutants_stage(
    bundle: Bundle,
    arrays: dict[str, ImageArrays],
    *,
    operator: str,
    rate: float,
    n_mutants: int,
    seed: int = 0,
    modules: tuple[str, ...] | list[str] | None = None,
    acceptance_images: int = 2000,
    progress: bool = True,
) -> None:
    """Generate mutants until ``n_mutants`` keep >= 90% of the original's val accuracy."""
    if bundle.stage_done("mutants"):
        return
    model = bundle.load_model()
    val = arrays["val"]
    n = min(len(val), acceptance_images)
    x_val = bundle.normalisation.apply(val.images[:n])
    start = time.perf_counter()
    mutants = generate_mutants(
        model, operator, rate, n_mutants, x_val, torch.from_numpy(val.labels[:n]), seed=seed, progress=progress,
        modules=list(modules) if modules else None,
    )
    bundle.write_json(MUTANTS_FILE, mutants.to_dict())
    filters = mutants.filters_per_mutant
    bundle.set(
        "mutants",
        {
            "operator": operator,
            "rate": rate,
            "modules": list(modules) if modules else None,
            "count": len(mutants.specs),
            "total_filters": mutants.total_filters,
            "filters_per_mutant": sorted(set(filters)),
            "attempts": mutants.attempts,
            "acceptance_rate": mutants.acceptance_rate,
            "acceptance_images": n,
            "original_accuracy": mutants.original_accuracy,
            "kept_accuracy_min": min(mutants.accuracies),
            "kept_accuracy_median": float(sorted(mutants.accuracies)[len(mutants.accuracies) // 2]),
            "weight_hashes": [mutant_weights_hash(model, spec) for spec in mutants.specs],
            "seconds": time.perf_counter() - start,
        },
    )
    bundle.mark_stage("mutants")


# ------------------------------------------------------------------------------ features
def features_stage(
    bundle: Bundle,
    arrays: dict[str, ImageArrays],
    *,
    batch_size: int = 256,
    early_stopping_alpha: float | None = None,
    early_stopping_chunk: int = 10,
    progress: bool = True,
) -> None:
    """Evidence for fit, val and test (resumable per split), then the LCR setting (see
    :func:`lcr_setting_stage`)."""
    extractor = None
    for split in FEATURE_SPLITS:
        stage = f"features:{split}"
        if bundle.stage_done(stage):
            continue
        extractor = extractor or load_extractor(bundle)
        start = time.perf_counter()
        feats = extract_features(
            extractor, bundle.normalisation, arrays[split], with_lcr=extractor.ensemble is not None,
            batch_size=batch_size, progress=progress, desc=f"features {split}",
        )
        bundle.write_features(split, feats)
        bundle.mark_stage(stage, images=len(arrays[split]), seconds=time.perf_counter() - start)
    lcr_setting_stage(bundle, alpha=early_stopping_alpha, chunk_size=early_stopping_chunk)


def lcr_setting_stage(bundle: Bundle, *, alpha: float | None, chunk_size: int = 10) -> None:
    """Full LCR, or an SPRT over chunks of mutants whose hypotheses come from the fit split.

    ``alpha`` (= beta) None keeps the full LCR. Otherwise p0 / p1 are the mean full LCR of the fit
    split's correct / wrong predictions, the setting goes into the manifest (``lcr.early_stopping``)
    for the server, and each split's ``lcr`` column becomes the replayed early-stopped LCR, which is
    what the detectors learn from and what the server will compute.
    """
    if bundle.stage_done("features:lcr") or not bundle.has_file(MUTANTS_FILE):
        return
    features = load_features(bundle)
    stopping = None
    if alpha is not None:
        fit = apply_early_stopping(features["fit"], None)
        rule = sprt_from_data(fit["lcr_full"], wrong_labels(fit), alpha=alpha)
        stopping = EarlyStopping(rule, chunk_size=chunk_size)
    used = {}
    for split, columns in features.items():
        updated = apply_early_stopping(columns, stopping)
        bundle.write_features(split, updated)
        used[split] = float(updated["mutants_used"].mean())
    bundle.set("lcr", {
        "early_stopping": stopping.to_dict() if stopping is not None else None,
        "mean_mutants_used": used,
        "hypotheses_from": "fit" if stopping is not None else None,
    })
    bundle.mark_stage("features:lcr")


# ------------------------------------------------------------------------------ detectors
OPERATING_POINTS = ("equal-recall", "correct-recall=0.98", "wrong-recall=0.995", "risk=0.02@0.95")


def detectors_stage(
    bundle: Bundle,
    *,
    seeds: int = 3,
    default_set: str | None = None,
    cond_inputs: str = "conductance",
    progress: bool = True,
) -> None:
    """Fit detectors for every signal set over several seeds; store seed 0's with operating points.

    ``cond_inputs`` is what the conductance detector reads: the paper's conductance alone, or
    conductance with the predicted class (recorded, so the gate builds the same inputs)."""
    if bundle.stage_done("detectors"):
        return
    features = load_features(bundle)
    start = time.perf_counter()
    first = fit_detectors(features, seed=0, cond_inputs=cond_inputs, progress=progress)
    fits = [first]
    chosen = {name: s.kind for name, s in first.sets.items()}
    for seed in range(1, seeds):
        fits.append(
            fit_detectors(features, seed=seed, chosen_kinds=chosen, cond_inputs=cond_inputs, progress=progress)
        )
    wrong_val = wrong_labels(features["val"])

    cond_info = ConductanceDetectorInfo(
        best_val_auroc=first.cond_detector.best_val_auroc_,
        best_epoch=first.cond_detector.best_epoch_,
        trained_on="fit",
        inputs=cond_inputs,
    )
    bundle.write_detector_state(cond_info.stem, *save_state(first.cond_detector))
    sets: dict[str, SignalSetInfo] = {}
    for name, set_fit in first.sets.items():
        stem = signal_set_stem(name)
        bundle.write_detector_state(stem, *save_state(set_fit.classifier))
        points, skipped = {}, {}
        for spec in OPERATING_POINTS:
            try:
                points[spec] = choose_threshold(set_fit.scores["val"], wrong_val, spec).to_dict()
            except ConfigError as exc:
                skipped[spec] = str(exc)
        sets[name] = SignalSetInfo(
            name=name,
            signals=tuple(set_fit.signals),
            stem=stem,
            operating_points=points,
            kind=set_fit.kind,
            val_auroc=set_fit.val_auroc_by_kind[set_fit.kind],
            details={"val_auroc_by_kind": set_fit.val_auroc_by_kind, "skipped_points": skipped},
        )
    scores: dict[str, np.ndarray] = {}
    for fit in fits:
        for split in FEATURE_SPLITS:
            scores[scores_key(fit.seed, "conductance-detector", split)] = fit.cond_scores[split]
            for name, set_fit in fit.sets.items():
                scores[scores_key(fit.seed, name, split)] = set_fit.scores[split]
                for kind, by_split in set_fit.scores_by_kind.items():
                    scores[scores_key(fit.seed, f"{name}@{kind}", split)] = by_split[split]
    bundle.write_arrays(SCORES_FILE, scores)
    if default_set is None:
        default_set = PAPER_SET if PAPER_SET in sets else "cond"
    if default_set not in sets:
        raise ConfigError(f"default signal set {default_set!r} was not fitted; fitted: {sorted(sets)}")
    section = DetectorsSection(
        conductance=cond_info,
        signal_sets=sets,
        default_set=default_set,
        seeds=tuple(fit.seed for fit in fits),
        details={"seconds": time.perf_counter() - start},
    )
    bundle.set("detectors", section.to_dict())
    bundle.mark_stage("detectors")

"""The open-world evaluation of a finished bundle: every signal set on clean, shifted and unknown
inputs, with detectors fitted on clean data (``clean``) or also on exposure rows (``exposed``).

Steps (``predgate open-world --bundle B``):

1. fit the open-set scorers: class Mahalanobis and deep kNN on the penultimate features of the
   CNN's training images, p-NormSoftmax and Relative Uncertainty on the fit split's logits, the
   DOCTOR perturbation step on fit images;
2. extract every suite's evidence through the bundle's own extractor (the server's code: forward,
   conductance, LCR with the bundle's early-stopping rule) plus penultimate features and the
   perturbed DOCTOR score; cached per suite in the bundle, so a rerun resumes;
3. fit the unified classifier of every signal set (the build's sets and the open-world ones) for
   several seeds with :func:`offline.fit.fit_detectors`, once on the clean fit split and once with
   the exposure rows added to fit (and val, where thresholds are chosen);
4. score every suite with every (variant, seed, set) and hand the scores to the report.

The build's own detectors are not changed: the open-world sets are measured here first, and only a
set that earns its cost becomes a bundle's default (docs/open-world.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.bundle import (
    DEFAULT_COND_INPUTS,
    OPEN_WORLD_DIR,
    SCORES_FILE,
    Bundle,
    SignalSetInfo,
    load_features,
    open_world_exposure_file,
    open_world_split_file,
    open_world_suite_file,
    scores_key,
    signal_set_stem,
    variant_conductance_stem,
)
from models.data import ImageArrays, load_splits
from models.detector_state import save_state
from models.errors import ConfigError
from models.evidence import EvidenceExtractor
from models.feature_scores import ClassMahalanobis, DeepKNN, PenultimateProbe
from models.fitted_scores import PNormSoftmax, RelativeUncertainty
from models.gate import load_early_stopping, load_extractor
from models.input_perturbation import PerturbedDoctor, choose_perturbation
from models.metrics import wrong_labels
from models.open_world_evidence import OpenWorldScorers
from models.operating_points import OperatingPoint, choose_threshold
from models.signals import CANDIDATE_SETS, OPEN_WORLD_SETS, conductance_inputs, signal_matrix
from offline.features import apply_early_stopping, extract_features
from offline.fit import DetectorFit, fit_detectors
from offline.open_world_suites import (
    EVAL_KINDS,
    evaluation_suites,
    exposure_rows,
)
from offline.stages import OPERATING_POINTS

log = logging.getLogger("predgate.open_world")

VARIANTS = ("clean", "exposed")
POINTS = OPERATING_POINTS


def _batches(n: int, batch_size: int) -> range:
    return range(0, n, batch_size)


def penultimate_features(
    model: torch.nn.Module,
    normalisation: Any,
    images: np.ndarray,
    *,
    batch_size: int = 512,
    progress: bool = False,
    desc: str = "penultimate",
) -> np.ndarray:
    """``N x D`` head inputs of raw ``images`` (one forward pass each)."""
    probe = PenultimateProbe(model)
    try:
        parts = []
        for start in tqdm(_batches(len(images), batch_size), desc=desc, disable=not progress, unit="batch"):
            _, feats = probe(normalisation.apply(images[start : start + batch_size]))
            parts.append(feats.double().numpy())
    finally:
        probe.close()
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def perturbed_scores(
    perturbed: PerturbedDoctor, normalisation: Any, images: np.ndarray, *, batch_size: int = 256
) -> np.ndarray:
    """The perturbed DOCTOR score of raw ``images``, batch by batch (one backward pass each)."""
    return np.concatenate(
        [
            perturbed(normalisation.apply(images[s : s + batch_size]))
            for s in _batches(len(images), batch_size)
        ]
    )


def suite_evidence(
    extractor: EvidenceExtractor,
    normalisation: Any,
    perturbed: PerturbedDoctor | None,
    images: np.ndarray,
    labels: np.ndarray,
    stopping: Any,
    *,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "evidence",
    with_lcr: bool = True,
) -> dict[str, np.ndarray]:
    """Every column the open world needs for raw ``images`` (labels -1 = unknown): the bundle's
    features (as the build stores them, early-stopped LCR included), ``penultimate`` and, given a
    fitted perturbation, ``doctor_pert``; ``seconds_*`` hold wall time per image of each part."""
    arrays = ImageArrays(images, np.zeros(len(images), dtype=np.int64), ["unknown"])
    start = time.perf_counter()
    feats = extract_features(
        extractor,
        normalisation,
        arrays,
        with_lcr=with_lcr and extractor.ensemble is not None,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )
    seconds_gate = time.perf_counter() - start
    feats["label"] = np.asarray(labels, dtype=np.int64)
    if "mutant_labels" in feats:
        feats = apply_early_stopping(feats, stopping)
    start = time.perf_counter()
    feats["penultimate"] = penultimate_features(extractor.model, normalisation, images, batch_size=batch_size)
    seconds_features = time.perf_counter() - start
    if perturbed is not None:
        start = time.perf_counter()
        feats["doctor_pert"] = perturbed_scores(perturbed, normalisation, images, batch_size=batch_size)
        feats["seconds_perturbation"] = np.array((time.perf_counter() - start) / max(len(images), 1))
    feats["seconds_gate"] = np.array(seconds_gate / max(len(images), 1))
    feats["seconds_penultimate"] = np.array(seconds_features / max(len(images), 1))
    return feats


def fit_scorers(
    bundle: Bundle,
    extractor: EvidenceExtractor,
    splits: dict[str, ImageArrays],
    features: dict[str, dict[str, np.ndarray]],
    *,
    perturbation_images: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> OpenWorldScorers:
    """Fit every open-set scorer (Mahalanobis / kNN on cnn-train, the rest on the fit split)."""
    normalisation = bundle.normalisation
    train = splits["cnn-train"]
    train_feats = penultimate_features(
        extractor.model, normalisation, train.images, progress=progress, desc="penultimate (cnn-train)"
    )
    maha = ClassMahalanobis().fit(train_feats, train.labels)
    knn = DeepKNN(k=min(10, len(train_feats)), bank_size=10000, seed=seed).fit(train_feats)
    fit = features["fit"]
    wrong = wrong_labels(fit)
    pnorm = PNormSoftmax().fit(fit["logits"], wrong)
    relu = RelativeUncertainty(seed=seed).fit(fit["logits"], wrong)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(wrong), min(perturbation_images, len(wrong)), replace=False))
    if len(set(wrong[pick])) < 2:
        pick = np.arange(len(wrong))
    x = normalisation.apply(splits["fit"].images[pick])
    perturbed, grid = choose_perturbation(extractor.model, tuple(normalisation.std), x, wrong[pick])
    setting = {"eps": perturbed.eps, "temperature": perturbed.temperature}
    return OpenWorldScorers(maha, knn, pnorm, relu, setting, grid)


@dataclass
class VariantFit:
    """Detectors of one variant for every seed, with operating points chosen on its val rows."""

    variant: str
    fits: list[DetectorFit]
    points: dict[tuple[int, str], dict[str, OperatingPoint]]

    def scores(
        self, seed: int, name: str, table: dict[str, np.ndarray], num_classes: int, cond_inputs: str
    ) -> np.ndarray:
        fit = self.fits[seed]
        cond = fit.cond_detector.decision_function(
            conductance_inputs(table["conductance"], table["prediction"], cond_inputs, num_classes)
        )
        chosen = fit.sets[name]
        return chosen.classifier.decision_function(
            signal_matrix(chosen.signals, table["logits"], cond, table.get("lcr"), extra=table)
        )


def concat_tables(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = [k for k in a if k in b and not k.startswith("seconds") and np.ndim(a[k]) >= 1]
    return {k: np.concatenate([a[k], b[k]], axis=1 if k == "mutant_labels" else 0) for k in keys}


def fit_variant(
    variant: str,
    tables: dict[str, dict[str, np.ndarray]],
    *,
    seeds: int,
    cond_inputs: str,
    signal_sets: dict[str, tuple[str, ...]],
    progress: bool = False,
    threshold_rows: int | None = None,
) -> VariantFit:
    """Every seed's detectors on ``tables``, with operating points chosen on val (only its first
    ``threshold_rows`` rows when given: rows added to val for model selection, e.g. reviewed
    rejections, then do not move the thresholds' promise)."""
    first = fit_detectors(tables, seed=0, signal_sets=signal_sets, cond_inputs=cond_inputs, progress=progress)
    chosen = {name: s.kind for name, s in first.sets.items()}
    fits = [first] + [
        fit_detectors(
            tables,
            seed=s,
            signal_sets=signal_sets,
            chosen_kinds=chosen,
            cond_inputs=cond_inputs,
            progress=progress,
        )
        for s in range(1, seeds)
    ]
    rows = slice(None) if threshold_rows is None else slice(0, threshold_rows)
    wrong_val = wrong_labels(tables["val"])[rows]
    points: dict[tuple[int, str], dict[str, OperatingPoint]] = {}
    for fit in fits:
        for name, set_fit in fit.sets.items():
            chosen_points = {}
            for spec in POINTS:
                try:
                    chosen_points[spec] = choose_threshold(set_fit.scores["val"][rows], wrong_val, spec)
                except ConfigError:
                    continue
            points[(fit.seed, name)] = chosen_points
    return VariantFit(variant, fits, points)


def fit_variants(
    tables: dict[str, dict[str, dict[str, np.ndarray]]],
    *,
    seeds: int,
    cond_inputs: str,
    signal_sets: dict[str, tuple[str, ...]],
    progress: bool = False,
) -> dict[str, VariantFit]:
    """:func:`fit_variant` for each variant's tables (variant name -> split -> table)."""
    out = {}
    for variant, var_tables in tables.items():
        log.info("fitting the %s detectors (%d seeds)", variant, seeds)
        out[variant] = fit_variant(
            variant,
            var_tables,
            seeds=seeds,
            cond_inputs=cond_inputs,
            signal_sets=signal_sets,
            progress=progress,
        )
    return out


@dataclass
class OpenWorldResult:
    """Everything the report needs: per suite its labels and predictions, and the scores of every
    (variant, seed, set); plus the scorers' settings, the operating points and the costs."""

    suites: dict[str, dict[str, Any]]
    scores: dict[str, dict[tuple[str, int, str], np.ndarray]]
    variants: dict[str, VariantFit]
    scorers: dict[str, Any]
    costs: dict[str, float]
    val_auroc: dict[tuple[str, str], float]
    accuracy_clean: float
    settings: dict[str, Any]
    fitted_scorers: OpenWorldScorers | None = None


def evidence_name(suite: str) -> str:
    return open_world_suite_file(suite)


def _cached(bundle: Bundle, name: str, compute: Any) -> dict[str, np.ndarray]:
    if bundle.has_file(name):
        return dict(bundle.read_arrays(name))
    table = compute()
    bundle.write_arrays(name, table)
    bundle.save()
    return table


def split_tables(
    bundle: Bundle,
    extractor: EvidenceExtractor,
    splits: dict[str, ImageArrays],
    features: dict[str, dict[str, Any]],
    scorers: OpenWorldScorers,
    perturbed: PerturbedDoctor,
    *,
    batch_size: int = 256,
) -> dict[str, dict[str, np.ndarray]]:
    """The stored fit / val / test features plus the open-world columns (penultimate features and the
    perturbed DOCTOR score, cached in the bundle per perturbation setting; then every scorer's column)."""
    normalisation = bundle.normalisation
    tables: dict[str, dict[str, np.ndarray]] = {}
    for split in ("fit", "val", "test"):
        imgs = splits[split].images

        def extra(imgs: np.ndarray = imgs) -> dict[str, np.ndarray]:
            return {
                "penultimate": penultimate_features(
                    extractor.model, normalisation, imgs, batch_size=batch_size
                ),
                "doctor_pert": perturbed_scores(perturbed, normalisation, imgs, batch_size=batch_size),
            }

        added = _cached(
            bundle,
            open_world_split_file(split, perturbed.eps, perturbed.temperature),
            extra,
        )
        table = {**features[split], **added}
        table.update(scorers.columns(table["logits"], table["penultimate"], table.get("doctor_pert")))
        tables[split] = table
    return tables


def exposure_tables(
    bundle: Bundle,
    extractor: EvidenceExtractor,
    splits: dict[str, ImageArrays],
    tables: dict[str, dict[str, np.ndarray]],
    scorers: OpenWorldScorers,
    perturbed: PerturbedDoctor,
    stopping: Any,
    *,
    exposure_images: int,
    seed: int,
    batch_size: int = 256,
    with_lcr: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """``tables`` with exposure rows appended to fit and val: ``exposure_images`` images of each
    under the exposure corruptions (never an evaluated kind) plus shuffled outliers. The clean rows
    come first, so ``table[:len(clean)]`` is the clean split. Evidence cached in the bundle."""
    exposed = dict(tables)
    rng = np.random.default_rng((seed, 12))
    for split in ("fit", "val"):
        arr = splits[split]
        idx = np.sort(rng.choice(len(arr), min(exposure_images, len(arr)), replace=False))
        ex_images, ex_labels = exposure_rows(
            arr.images[idx],
            arr.labels[idx],
            n_outliers=max(1, len(idx) // 5),
            seed=seed + (1 if split == "val" else 0),
        )
        ex = _cached(
            bundle,
            open_world_exposure_file(split, with_lcr),
            lambda i=ex_images, lab=ex_labels: suite_evidence(
                extractor,
                bundle.normalisation,
                perturbed,
                i,
                lab,
                stopping,
                batch_size=batch_size,
                with_lcr=with_lcr,
            ),
        )
        ex.update(scorers.columns(ex["logits"], ex["penultimate"], ex.get("doctor_pert")))
        exposed[split] = concat_tables(tables[split], ex)
    return exposed


def run_open_world(
    bundle: Bundle,
    *,
    images: int = 300,
    kinds: tuple[str, ...] = EVAL_KINDS,
    severities: tuple[int, ...] = (1, 2, 3, 4, 5),
    exposure_images: int = 1000,
    seeds: int = 3,
    seed: int = 0,
    data_roots: dict[str, str | None] | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> OpenWorldResult:
    """Run steps 1-4 of the module docstring; evidence is cached in the bundle (resumable)."""
    settings = {
        "images": images,
        "kinds": list(kinds),
        "severities": list(severities),
        "exposure_images": exposure_images,
        "seeds": seeds,
        "seed": seed,
    }
    recorded = bundle.get(OPEN_WORLD_DIR) or {}
    if recorded.get("settings") not in (None, settings):
        raise ConfigError(
            f"this bundle's open-world evidence was made with {recorded['settings']}, not {settings}: "
            "rerun with the same settings, or remove the bundle's open_world/ files to start anew"
        )
    bundle.set(OPEN_WORLD_DIR, {**recorded, "settings": settings})
    torch.manual_seed(seed)
    extractor = load_extractor(bundle)
    stopping = load_early_stopping(bundle)
    normalisation = bundle.normalisation
    splits = load_splits(bundle)
    features = {k: dict(v) for k, v in load_features(bundle).items()}
    log.info("open world: fitting the open-set scorers")
    scorers = fit_scorers(bundle, extractor, splits, features, seed=seed, progress=progress)
    perturbed = scorers.perturbed_doctor(extractor.model, tuple(normalisation.std))

    tables = split_tables(bundle, extractor, splits, features, scorers, perturbed, batch_size=batch_size)
    dataset = bundle.manifest["dataset"]["name"]

    # Suites (clean test images first: the corruptions are of the same images).
    test = splits["test"]
    suites = evaluation_suites(
        test.images,
        test.labels,
        images=images,
        kinds=kinds,
        severities=severities,
        dataset=dataset,
        seed=seed,
        data_roots=data_roots,
    )
    log.info("open world: %d suites of up to %d images", len(suites), images)

    suite_tables: dict[str, dict[str, np.ndarray]] = {}
    for suite in tqdm(suites, desc="open-world suites", disable=not progress, unit="suite"):
        table = _cached(
            bundle,
            evidence_name(suite.name),
            lambda s=suite: suite_evidence(
                extractor,
                normalisation,
                perturbed,
                s.images,
                s.labels,
                stopping,
                batch_size=batch_size,
            ),
        )
        table.update(scorers.columns(table["logits"], table["penultimate"], table.get("doctor_pert")))
        suite_tables[suite.name] = table

    exposed_tables = exposure_tables(
        bundle,
        extractor,
        splits,
        tables,
        scorers,
        perturbed,
        stopping,
        exposure_images=exposure_images,
        seed=seed,
        batch_size=batch_size,
    )

    signal_sets = {**CANDIDATE_SETS, **OPEN_WORLD_SETS}
    if extractor.ensemble is None:
        signal_sets = {k: v for k, v in signal_sets.items() if "lcr" not in v}
    cond_inputs = bundle.detectors.conductance.inputs if bundle.detectors else DEFAULT_COND_INPUTS
    num_classes = int(bundle.manifest["architecture"]["num_classes"])
    variants = fit_variants(
        {"clean": tables, "exposed": exposed_tables},
        seeds=seeds,
        cond_inputs=cond_inputs,
        signal_sets=signal_sets,
        progress=progress,
    )

    scores: dict[str, dict[tuple[str, int, str], np.ndarray]] = {}
    for name, table in suite_tables.items():
        scores[name] = {
            (variant, fit.seed, set_name): vf.scores(fit.seed, set_name, table, num_classes, cond_inputs)
            for variant, vf in variants.items()
            for fit in vf.fits
            for set_name in fit.sets
        }
    val_auroc = {
        (variant, name): s.val_auroc_by_kind[s.kind]
        for variant, vf in variants.items()
        for name, s in vf.fits[0].sets.items()
    }
    costs = {
        "gate_ms": float(np.mean([t["seconds_gate"] for t in suite_tables.values()]) * 1e3),
        "penultimate_ms": float(np.mean([t["seconds_penultimate"] for t in suite_tables.values()]) * 1e3),
        "perturbation_ms": float(np.mean([t["seconds_perturbation"] for t in suite_tables.values()]) * 1e3),
    }
    suites_out = {
        s.name: {
            "regime": s.regime,
            "kind": s.kind,
            "severity": s.severity,
            "label": suite_tables[s.name]["label"],
            "prediction": suite_tables[s.name]["prediction"],
            "logits": suite_tables[s.name]["logits"],
            "mutants_used": suite_tables[s.name].get("mutants_used"),
        }
        for s in suites
    }
    accuracy_clean = float(1 - wrong_labels(tables["test"]).mean())
    return OpenWorldResult(
        suites_out,
        scores,
        variants,
        scorers.summary() | {"perturbation_grid": scorers.perturbation_grid},
        costs,
        val_auroc,
        accuracy_clean,
        settings,
        scorers,
    )


def served_name(key: str) -> str:
    """The bundle's name of an evaluated ``variant/set``: the set's own for ``clean``, with
    ``-exposed`` appended for the exposed variant."""
    variant, name = key.split("/", 1)
    return name if variant == "clean" else f"{name}-{variant}"


def adopt(bundle: Bundle, result: OpenWorldResult, keys: list[str], default: str | None = None) -> list[str]:
    """Store the open-world scorers and the seed-0 detectors of ``keys`` (``variant/set``) in the
    bundle as servable signal sets, with operating points chosen on the variant's val rows;
    ``default`` (one of ``keys``) becomes the bundle's default set. Returns the served names."""
    if result.fitted_scorers is None:
        raise ConfigError("this result has no fitted scorers to store")
    clean_fit = result.variants.get("clean", next(iter(result.variants.values()))).fits[0]
    clean_rows = {split: len(s) for split, s in next(iter(clean_fit.sets.values())).scores.items()}
    return store_sets(bundle, result.variants, result.fitted_scorers, clean_rows, keys, default)


def store_sets(
    bundle: Bundle,
    variants: dict[str, VariantFit],
    scorers: OpenWorldScorers | None,
    clean_rows: dict[str, int],
    keys: list[str],
    default: str | None = None,
    chosen_by: str = "open-world report (report/open_world.md)",
    source: dict[str, Any] | None = None,
) -> list[str]:
    """What :func:`adopt` stores, from the fitted variants themselves. ``clean_rows``: per split, how
    many leading rows are the clean split (the exposed variant's splits end with exposure rows); the
    stored scores (the drift monitor's reference is val) are those of the clean rows.

    A set of the exposed variant that reads ``cond`` is stored with that variant's own conductance
    detector (``detectors/conductance-exposed``), which the gate then uses for it. ``scorers`` None:
    the sets read no open-world signal (a refit of a build set); ``source`` replaces the details that
    say where a set comes from (default: the open-world variant).
    """
    section = bundle.detectors
    if section is None:
        raise ConfigError("the bundle has no detectors section: build it to the end first")
    if scorers is not None:
        scorers.save(bundle)
    sets = dict(section.signal_sets)
    stored_scores = bundle.read_arrays(SCORES_FILE) if bundle.has_file(SCORES_FILE) else {}
    names = []
    for key in keys:
        variant, name = key.split("/", 1) if "/" in key else ("", key)
        if variant not in variants or name not in variants[variant].fits[0].sets:
            evaluated = sorted(f"{v}/{n}" for v, vf in variants.items() for n in vf.fits[0].sets)
            raise ConfigError(f"{key!r} was not fitted; fitted sets: {evaluated}")
        set_fit = variants[variant].fits[0].sets[name]
        serve_as = served_name(key)
        own_cond: dict[str, str] = {}
        if variant != "clean" and "cond" in set_fit.signals:
            # The variant refitted the conductance detector on its rows: the set is served with it.
            own_cond["cond_detector_stem"] = variant_conductance_stem(variant)
            own = save_state(variants[variant].fits[0].cond_detector)
            bundle.write_detector_state(own_cond["cond_detector_stem"], *own)
        stem = signal_set_stem(serve_as)
        bundle.write_detector_state(stem, *save_state(set_fit.classifier))
        for fit in variants[variant].fits:  # every seed, as the build stores its own sets
            for split, split_scores in fit.sets[name].scores.items():
                clean = np.asarray(split_scores)[: clean_rows[split]]
                stored_scores[scores_key(fit.seed, serve_as, split)] = clean
        points = variants[variant].points[(0, name)]
        sets[serve_as] = SignalSetInfo(
            name=serve_as,
            signals=tuple(set_fit.signals),
            stem=stem,
            operating_points={p: op.to_dict() for p, op in points.items()},
            kind=set_fit.kind,
            val_auroc=set_fit.val_auroc_by_kind[set_fit.kind],
            details={
                "val_auroc_by_kind": set_fit.val_auroc_by_kind,
                "skipped_points": {p: "infeasible on val" for p in OPERATING_POINTS if p not in points},
                **(source or {"source": f"open-world ({variant} variant)"}),
                **own_cond,
            },
        )
        names.append(serve_as)
    bundle.write_arrays(SCORES_FILE, stored_scores)
    details = dict(section.details)
    default_set = section.default_set
    if default is not None:
        if default not in keys:
            raise ConfigError(f"the default {default!r} must be one of the adopted sets {keys}")
        default_set = served_name(default)
        details["default_chosen_by"] = chosen_by
    updated = replace(section, signal_sets=sets, default_set=default_set, details=details)
    bundle.set("detectors", updated.to_dict())
    bundle.save()
    return names


def fit_default_set(
    bundle: Bundle,
    key: str,
    *,
    exposure_images: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> str:
    """Fit the open-set scorers and the one signal set ``key`` (``variant/set``, e.g. the one an
    open-world report chose on a reference bundle) on this bundle's own splits, without the
    evaluation suites, and make it the bundle's default. This is what a build does when its profile
    names such a default, so that a fresh bundle serves it without an hour of open-world evaluation;
    the evaluation itself (``predgate open-world``) stays the way to check the choice on this CNN."""
    variant, name = key.split("/", 1)
    if variant not in VARIANTS:
        raise ConfigError(f"default set {key!r}: the variant must be one of {VARIANTS}")
    every = {**CANDIDATE_SETS, **OPEN_WORLD_SETS}
    if name not in every:
        raise ConfigError(f"default set {key!r}: unknown set; known: {sorted(every)}")
    torch.manual_seed(seed)
    extractor = load_extractor(bundle)
    if "lcr" in every[name] and extractor.ensemble is None:
        raise ConfigError(f"default set {key!r} needs LCR, and this bundle has no mutants")
    stopping = load_early_stopping(bundle)
    splits = load_splits(bundle)
    features = {k: dict(v) for k, v in load_features(bundle).items()}
    scorers = fit_scorers(bundle, extractor, splits, features, seed=seed, progress=progress)
    perturbed = scorers.perturbed_doctor(extractor.model, tuple(bundle.normalisation.std))
    tables = split_tables(bundle, extractor, splits, features, scorers, perturbed, batch_size=batch_size)
    clean_rows = {split: len(t["label"]) for split, t in tables.items()}
    if variant == "exposed":
        tables = exposure_tables(
            bundle,
            extractor,
            splits,
            tables,
            scorers,
            perturbed,
            stopping,
            exposure_images=exposure_images,
            seed=seed,
            batch_size=batch_size,
            with_lcr="lcr" in every[name],
        )
    section = bundle.detectors
    cond_inputs = section.conductance.inputs if section else DEFAULT_COND_INPUTS
    seeds = len(section.seeds) if section else 1
    fitted = fit_variant(
        variant, tables, seeds=seeds, cond_inputs=cond_inputs, signal_sets={name: every[name]}
    )
    return store_sets(
        bundle,
        {variant: fitted},
        scorers,
        clean_rows,
        [key],
        default=key,
        chosen_by="build profile: the set the open-world report chose on the reference bundle "
        "(docs/open-world.md)",
    )[0]

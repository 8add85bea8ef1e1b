"""Refit the served signal set with reviewed rejections, and say whether that helped.

``predgate build --from BUNDLE --out NEW --redo detectors --reviews DB``: the people behind the review
page have labelled inputs the gate answered ``unknown`` (docs/fallback.md). Those are exactly the
inputs the detectors know least about: shifted, unusual, out of the classes. Half of the reviewed
items (stratified by whether the CNN was right) become extra rows of the detectors' data, two thirds
of them in the fit split and one third in val (where the classifier's kind is chosen and the
conductance detector stops early, so that the selection sees the reviewed kind of input too); the
other half is held out, and the report compares, on it and on the clean test split:

- ``base``: the served set fitted as the base bundle fitted it (same tables, same seeds); this arm is
  checked against the base bundle's stored scores, so the comparison is against what is served;
- ``reviewed``: the same fit with the refit half of the reviews added to the fit split;
- MSP and DOCTOR, the free softmax baselines, on the same images.

Every detector seed is fitted in both arms; a gain is claimed only where the paired bootstrap CI of
the held-out AUROC difference is above 0 for every seed. The refitted set is stored as a new signal
set (``<served>-reviewed``, with its own conductance detector) and becomes the new bundle's default;
the base set stays in the bundle, so ``PREDGATE_SIGNAL_SET`` can switch back. Thresholds are chosen on
val as the base chose them: the reviews move the detector, not the operating point's promise, which
is a statement about the clean val split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import (
    DEFAULT_COND_INPUTS,
    REVIEWS_REPORT_JSON,
    REVIEWS_SECTION,
    SCORES_FILE,
    Bundle,
    load_bundle,
    load_features,
    scores_key,
)
from models.data import load_splits
from models.errors import BundleError, ConfigError
from models.evidence import EvidenceExtractor
from models.gate import load_early_stopping, load_extractor
from models.metrics import accuracy_with_fallback, paired_bootstrap_auroc, wrong_labels
from models.open_world_evidence import OpenWorldScorers
from models.operating_points import OperatingPoint
from models.scores import doctor, msp_score
from models.signals import OPEN_WORLD_SIGNALS, needs_lcr
from offline.build import derive_from
from offline.open_world import (
    VariantFit,
    concat_tables,
    exposure_tables,
    fit_variant,
    split_tables,
    store_sets,
    suite_evidence,
)
from offline.reviews import ReviewedInputs, read_reviews, split_indices, split_reviews

MIN_PER_PART = 5
"""Right and wrong answers each part of the reviews must hold at least (refit and held-out)."""

REFIT_SUFFIX = "reviewed"
VAL_SHARE = 1 / 3
"""Share of the refit reviews added to val (model selection and early stopping), the rest to fit."""


def take_rows(table: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``idx`` of an evidence table (mutant labels are M x N: columns there)."""
    return {
        k: (v[:, idx] if k == "mutant_labels" else v[idx])
        if np.ndim(v) >= 1 and not k.startswith("seconds")
        else v
        for k, v in table.items()
    }


def _say(message: str) -> None:
    print(f"[predgate build --reviews] {message}", flush=True)


@dataclass(frozen=True)
class ServedSet:
    """The set a bundle serves by default, traced back to how it was fitted: ``variant`` ``clean``
    (the build's tables, or the open-world clean variant) or ``exposed`` (exposure rows added)."""

    served: str
    variant: str
    name: str
    signals: tuple[str, ...]
    point: str

    @property
    def needs_scorers(self) -> bool:
        return self.variant != "clean" or any(s in OPEN_WORLD_SIGNALS for s in self.signals)

    @property
    def refit_variant(self) -> str:
        return REFIT_SUFFIX if self.variant == "clean" else f"{self.variant}-{REFIT_SUFFIX}"

    @property
    def refit_name(self) -> str:
        return f"{self.name}-{self.refit_variant}"


def served_set(bundle: Bundle) -> ServedSet:
    """The bundle's default set; for a set that is itself a refit, the set it refitted (a refit always
    starts from the original tables plus every review in the file given)."""
    section = bundle.detectors
    if section is None:
        raise BundleError(f"{bundle.path} has no detectors: build it to the end first (predgate build)")
    info = section.signal_sets[section.default_set]
    origin = info.details.get("refit_of")
    if origin:
        base = section.signal_sets.get(origin["served"])
        if base is None:
            raise BundleError(
                f"the default set {info.name!r} refits {origin['served']!r}, which the bundle lacks"
            )
        return ServedSet(
            origin["served"], origin["variant"], origin["name"], tuple(base.signals), base.default_point
        )
    source = str(info.details.get("source", ""))
    variant = "clean"
    if source.startswith("open-world ("):
        variant = source.removeprefix("open-world (").split(" ")[0]
    name = info.name if variant == "clean" else info.name.removesuffix(f"-{variant}")
    return ServedSet(info.name, variant, name, tuple(info.signals), info.default_point)


def _check_parts(refit: ReviewedInputs, held: ReviewedInputs, total: int, skipped: dict[str, int]) -> None:
    for part, name in ((refit, "refit"), (held, "held-out")):
        right, wrong = int((~part.wrong).sum()), int(part.wrong.sum())
        if right < MIN_PER_PART or wrong < MIN_PER_PART:
            raise ConfigError(
                f"{total} reviewed items fit this bundle ({int(sum(skipped.values()))} skipped: "
                f"{skipped or 'none'}); the {name} part holds {right} right and {wrong} wrong answers, and "
                f"each part needs at least {MIN_PER_PART} of both to refit and to judge the refit. Review "
                "more items on the review page (both answers the CNN had right and ones it had wrong), then "
                "build again"
            )


def _tables(
    bundle: Bundle, plan: ServedSet, extractor: EvidenceExtractor, stopping: Any, *, batch_size: int
) -> tuple[dict[str, dict[str, np.ndarray]], OpenWorldScorers | None, Any, dict[str, int]]:
    """The tables the base fitted the set on (read from the bundle's features and open-world caches),
    its open-set scorers and perturbation (None for a build set), and the clean rows per split."""
    features = {k: dict(v) for k, v in load_features(bundle).items()}
    clean_rows = {split: len(t["label"]) for split, t in features.items()}
    if not plan.needs_scorers:
        return features, None, None, clean_rows
    scorers = OpenWorldScorers.load(bundle)
    splits = load_splits(bundle)
    perturbed = scorers.perturbed_doctor(extractor.model, tuple(bundle.normalisation.std))
    tables = split_tables(bundle, extractor, splits, features, scorers, perturbed, batch_size=batch_size)
    if plan.variant == "exposed":
        profile_seed = int((bundle.manifest.get("profile") or {}).get("seed", 0))
        tables = exposure_tables(
            bundle,
            extractor,
            splits,
            tables,
            scorers,
            perturbed,
            stopping,
            exposure_images=1000,
            seed=profile_seed,
            batch_size=batch_size,
            with_lcr=needs_lcr(plan.signals),
        )
    elif plan.variant != "clean":
        raise BundleError(
            f"the default set comes from an open-world variant {plan.variant!r} this refit cannot rebuild"
        )
    return tables, scorers, perturbed, clean_rows


def _review_table(
    bundle: Bundle,
    plan: ServedSet,
    extractor: EvidenceExtractor,
    stopping: Any,
    scorers: OpenWorldScorers | None,
    perturbed: Any,
    reviewed: ReviewedInputs,
    *,
    batch_size: int,
    progress: bool,
    desc: str,
) -> dict[str, np.ndarray]:
    """The reviewed images' evidence, computed by the bundle's own extractor (as the server does)."""
    table = suite_evidence(
        extractor,
        bundle.normalisation,
        perturbed,
        reviewed.images,
        reviewed.labels,
        stopping,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
        with_lcr=needs_lcr(plan.signals),
    )
    if scorers is not None:
        table.update(scorers.columns(table["logits"], table["penultimate"], table.get("doctor_pert")))
    return table


def _at_point(scores: np.ndarray, wrong: np.ndarray, point: OperatingPoint) -> dict[str, Any]:
    """What the arm's threshold accepts, by the gate's own verdict rule (:meth:`OperatingPoint.reject`)."""
    rejected = point.reject(scores)
    accepted = ~rejected
    return {
        **accuracy_with_fallback(wrong, rejected),
        "accepted": int(accepted.sum()),
        "accepted_right": int((accepted & ~wrong).sum()),
        "accepted_wrong": int((accepted & wrong).sum()),
    }


SOFTMAX_BASELINES = {"msp": msp_score, "doctor": doctor}
"""The free scores a refit must also beat: maximum softmax probability and DOCTOR, from the same logits."""


def auroc_comparison(
    refit: np.ndarray, others: dict[str, np.ndarray], wrong: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any]:
    """AUROC of ``refit`` and of every score in ``others`` on the same images, with the paired bootstrap
    CI of refit - each (``diff_vs_<name>``, ``ci_vs_<name>``). Used by the report and the stream check."""
    out: dict[str, Any] = {"auroc": {}}
    for name, other in others.items():
        cmp = paired_bootstrap_auroc(refit, other, wrong, n_boot, seed)
        out["auroc"]["reviewed"] = cmp["auroc_a"]
        out["auroc"][name] = cmp["auroc_b"]
        out[f"diff_vs_{name}"] = cmp["diff"]
        out[f"ci_vs_{name}"] = list(cmp["ci_diff"])
    return out


def baseline_scores(logits: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.asarray(score(logits)) for name, score in SOFTMAX_BASELINES.items()}


def _compare(
    base: VariantFit,
    refit: VariantFit,
    plan: ServedSet,
    held: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    *,
    num_classes: int,
    cond_inputs: str,
    n_boot: int,
) -> list[dict[str, Any]]:
    """Per seed: AUROC of both arms, MSP and DOCTOR on the held-out reviews and on clean test, paired
    bootstrap CIs of refit - each, and what each arm's threshold accepts."""
    parts = {"held_out": held, "test": test}
    wrong = {part: wrong_labels(table) for part, table in parts.items()}
    free = {part: baseline_scores(table["logits"]) for part, table in parts.items()}
    per_seed = []
    for seed in range(len(base.fits)):
        scores = {
            arm: {
                part: fit.scores(seed, plan.name, table, num_classes, cond_inputs)
                for part, table in parts.items()
            }
            for arm, fit in (("base", base), ("reviewed", refit))
        }
        row: dict[str, Any] = {"seed": seed, "scores": scores}
        for part in parts:
            others = {"base": scores["base"][part], **free[part]}
            row[part] = auroc_comparison(scores["reviewed"][part], others, wrong[part], n_boot, seed)
            row[part]["at_point"] = {
                arm: _at_point(scores[arm][part], wrong[part], fit.points[(seed, plan.name)][plan.point])
                if plan.point in fit.points[(seed, plan.name)]
                else None  # infeasible on this arm's val
                for arm, fit in (("base", base), ("reviewed", refit))
            }
        per_seed.append(row)
    return per_seed


def verdict(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """What the seeds say together: a gain only where every seed's CI is above 0."""

    def every_seed_above(part: str, name: str) -> bool:
        return all(row[part][f"ci_vs_{name}"][0] > 0 for row in per_seed)

    helped = every_seed_above("held_out", "base")
    hurt = any(row["held_out"]["ci_vs_base"][1] < 0 for row in per_seed)
    clean_worse = any(row["test"]["ci_vs_base"][1] < 0 for row in per_seed)
    beats_free = every_seed_above("held_out", "msp") and every_seed_above("held_out", "doctor")
    if helped:
        text = (
            "the refit helped: held-out reviewed AUROC above the base's on every seed "
            "(paired bootstrap CI > 0)"
        )
    elif hurt:
        text = "the refit hurt: held-out reviewed AUROC below the base's (CI < 0 on at least one seed)"
    else:
        text = "no gain shown: the held-out reviewed AUROC's CI includes 0 on at least one seed"
    text += "; clean test AUROC " + (
        "fell (CI < 0 on a seed)" if clean_worse else "did not fall significantly"
    )
    text += "; " + (
        "above MSP and DOCTOR on the held-out reviews on every seed"
        if beats_free
        else "NOT above both MSP and DOCTOR on the held-out reviews on every seed (softmax confidence is "
        "as good or better)"
    )
    return {
        "helped": helped,
        "hurt": hurt,
        "clean_test_worse": clean_worse,
        "beats_msp_and_doctor_on_held_out": beats_free,
        "text": text,
    }


def refit_from_reviews(
    base: Path,
    out: Path,
    reviews: Path,
    *,
    held_out: float = 0.5,
    seed: int = 0,
    n_boot: int = 1000,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Copy ``base`` to ``out``, refit its served set with the reviews of ``reviews``, store the refit as
    the new default set and write the report (``report/reviews.{json,md}`` and a ROC plot). Returns the
    report's summary."""
    from offline.review_report import write_review_report  # matplotlib only when writing the report

    start = time.perf_counter()
    if derive_from(base, out):
        _say(f"copied {base} to {out}")
    bundle = load_bundle(out)
    plan = served_set(bundle)
    reviewed = read_reviews(reviews, bundle)
    _say(
        f"{len(reviewed)} reviewed items fit this bundle ({int(reviewed.wrong.sum())} the CNN had wrong, "
        f"{int((reviewed.labels < 0).sum())} of no class); skipped: {reviewed.skipped or 'none'}"
    )
    refit_part, held_part = split_reviews(reviewed, held_out, seed)
    _check_parts(refit_part, held_part, len(reviewed), reviewed.skipped)
    _say(
        f"refitting {plan.served!r} ({plan.variant} variant of {plan.name}) with {len(refit_part)} reviews; "
        f"{len(held_part)} held out"
    )
    extractor = load_extractor(bundle)
    stopping = load_early_stopping(bundle)
    tables, scorers, perturbed, clean_rows = _tables(bundle, plan, extractor, stopping, batch_size=batch_size)
    refit_table, held_table = (
        _review_table(
            bundle,
            plan,
            extractor,
            stopping,
            scorers,
            perturbed,
            part,
            batch_size=batch_size,
            progress=progress,
            desc=f"evidence ({name} reviews)",
        )
        for part, name in ((refit_part, "refit"), (held_part, "held-out"))
    )
    section = bundle.detectors
    assert section is not None
    cond_inputs = section.conductance.inputs if section.conductance else DEFAULT_COND_INPUTS
    seeds = len(section.seeds)
    sets = {plan.name: plan.signals}
    _say(f"fitting both arms, {seeds} seeds each")
    base_fit = fit_variant(
        plan.variant, tables, seeds=seeds, cond_inputs=cond_inputs, signal_sets=sets, progress=progress
    )
    # A third of the refit reviews joins val, where the classifier's kind is chosen and the conductance
    # detector stops early: selected on clean val alone, the refit would be judged only by what it does
    # to clean images. Thresholds stay chosen on the base's val rows.
    fit_rows, val_rows = split_indices(wrong_labels(refit_table), VAL_SHARE, seed + 1)
    with_reviews = {
        **tables,
        "fit": concat_tables(tables["fit"], take_rows(refit_table, fit_rows)),
        "val": concat_tables(tables["val"], take_rows(refit_table, val_rows)),
    }
    refit = fit_variant(
        plan.refit_variant,
        with_reviews,
        seeds=seeds,
        cond_inputs=cond_inputs,
        signal_sets=sets,
        progress=progress,
        threshold_rows=len(tables["val"]["label"]),
    )
    stored = bundle.read_arrays(SCORES_FILE)
    reproduced = float(
        np.max(
            np.abs(
                base_fit.fits[0].sets[plan.name].scores["test"][: clean_rows["test"]]
                - stored[scores_key(0, plan.served, "test")]
            )
        )
    )
    num_classes = int(bundle.manifest["architecture"]["num_classes"])
    per_seed = _compare(
        base_fit,
        refit,
        plan,
        held_table,
        tables["test"],
        num_classes=num_classes,
        cond_inputs=cond_inputs,
        n_boot=n_boot,
    )
    judged = verdict(per_seed)
    prediction_changed = int(
        (held_table["prediction"] != held_part.predicted).sum()
        + (refit_table["prediction"] != refit_part.predicted).sum()
    )
    key = f"{plan.refit_variant}/{plan.name}"
    counts = {
        "reviewed": len(reviewed),
        "refit": len(refit_part),
        "held_out": len(held_part),
        "wrong": int(reviewed.wrong.sum()),
        "none_of_these": int((reviewed.labels < 0).sum()),
        "skipped": reviewed.skipped,
        "prediction_changed": prediction_changed,
    }
    store_sets(
        bundle,
        {plan.refit_variant: refit},
        scorers,
        clean_rows,
        [key],
        default=key,
        chosen_by=f"refit from reviews ({REVIEWS_REPORT_JSON})",
        source={
            "source": f"refit of {plan.served} with reviewed rejections",
            "refit_of": {"served": plan.served, "variant": plan.variant, "name": plan.name},
            "reviews": {k: v for k, v in counts.items() if k != "skipped"},
        },
    )
    summary = {
        "base_bundle": load_bundle(base, verify=False).manifest["bundle_id"],
        "bundle": bundle.manifest["bundle_id"],
        "served_before": plan.served,
        "served_after": plan.refit_name,
        "variant": plan.variant,
        "operating_point": plan.point,
        "seeds": seeds,
        "n_boot": n_boot,
        "held_out_fraction": held_out,
        "split_seed": seed,
        "reviews_file": Path(reviews).name,
        "counts": counts,
        "base_arm_max_abs_diff_vs_stored": reproduced,
        "per_seed": [{k: v for k, v in row.items() if k != "scores"} for row in per_seed],
        "verdict": judged,
        "seconds": time.perf_counter() - start,
    }
    write_review_report(bundle, summary, per_seed, held_table, wrong_labels(held_table))
    bundle.set(
        REVIEWS_SECTION, {k: summary[k] for k in ("served_before", "served_after", "counts", "verdict")}
    )
    bundle.mark_stage("detectors:reviews", seconds=summary["seconds"])
    bundle.save()
    _say(judged["text"])
    _say(
        f"default signal set: {plan.refit_name} (the base set {plan.served!r} stays; PREDGATE_SIGNAL_SET "
        "switches)"
    )
    return summary

"""``python -m bench.below_floor``: two ways below the (1 + M) forward-pass floor and what they cost in AUROC.

(a) Early-stopping LCR (:mod:`models.sequential_lcr`) is replayed on the bundle's stored per-mutant
labels of val and test: no CNN runs, every image of both splits counts. A gated prediction then
costs ``1 + mean mutants used`` forward-equivalents (one forward gives the prediction and the
shortcut conductance, each mutant one more).

(b) Mutants restricted to later layers (:mod:`models.prefix_ensemble`) are generated with the
bundle's operator, rate, count and 90% acceptance rule, their LCR is computed on val and test
images reloaded from the bundle's data, and its AUROC is compared with the stored full LCR on the
same images. Cost is measured: the restricted ensemble at batch 64 against plain forwards of the
same batch timed just before and after it (ratios travel, seconds do not; interleaving keeps them
steady on shared cores), next to the FLOP count the split implies. Early stopping over restricted mutants
combines both.

A setting is marked for adoption when its val LCR AUROC is at most 0.005 below the full LCR's on the
same images and it costs at most 40 forward-equivalents per gated prediction.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import finish
from models.bundle import SCORES_FILE, Bundle, load_bundle, load_features, scores_key
from models.costs import median_seconds, timed_runs
from models.data import load_splits
from models.gate import load_detector, load_mutants
from models.lcr import MutantEnsemble
from models.metrics import auroc, wrong_labels
from models.mutant_search import generate_mutants_in
from models.prefix_ensemble import PrefixSharingEnsemble
from models.progress import progress_wanted
from models.sequential_lcr import SPRT, Curtailed, StoppingRule, rule_to_dict, simulate_sequential
from models.signals import conductance_inputs, needs_lcr, signal_matrix

MAX_AUROC_LOSS = 0.005
MAX_FORWARD_EQUIVALENTS = 40.0
TIMING_BATCH = 64


@dataclass(frozen=True)
class Sequential:
    """One early-stopping setting: a rule, a chunk size and a floor on mutants used."""

    name: str
    rule: StoppingRule
    chunk_size: int = 10
    min_mutants: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": rule_to_dict(self.rule),
            "chunk_size": self.chunk_size,
            "min_mutants": self.min_mutants,
        }

    def run(self, labels: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return simulate_sequential(labels, prediction, self.rule, self.chunk_size, self.min_mutants)


def val_hypotheses(lcr: np.ndarray, wrong: np.ndarray, total: int) -> tuple[float, float]:
    """SPRT ``p0`` / ``p1`` from val: the mean full LCR of correct / wrong predictions, kept apart
    (p1 >= 2 p0) so that the trade-off curve explores a test that can stop. The build's setting
    (:func:`models.sequential_lcr.sprt_from_data`) takes the fit split's means as they are."""
    p0 = float(np.clip(lcr[~wrong].mean(), 0.5 / total, 0.5))
    p1 = float(np.clip(lcr[wrong].mean(), min(2 * p0, 0.9), 0.95))
    return p0, p1


def sequential_settings(val: dict[str, np.ndarray]) -> list[Sequential]:
    """Rules to try; ``p0``/``p1`` default to the mean full LCR of correct / wrong val predictions."""
    wrong = wrong_labels(val).astype(bool)
    total = len(val["mutant_labels"])
    p0, p1 = val_hypotheses(val["lcr"], wrong, total)
    # Curtailed at the val threshold that best separates by full LCR (Youden's J).
    thresholds = np.unique(val["lcr"])
    j = [(val["lcr"][wrong] >= t).mean() - (val["lcr"][~wrong] >= t).mean() for t in thresholds]
    youden = float(thresholds[int(np.argmax(j))])
    name = f"p0={p0:.3f},p1={p1:.3f}"
    return [
        Sequential(f"sprt {name} a=b=0.05 k=10", SPRT(p0, p1, 0.05, 0.05)),
        Sequential(f"sprt {name} a=b=0.01 k=10", SPRT(p0, p1, 0.01, 0.01)),
        Sequential(f"sprt {name} a=b=0.001 k=10", SPRT(p0, p1, 0.001, 0.001)),
        Sequential(f"sprt {name} a=b=0.01 k=5", SPRT(p0, p1, 0.01, 0.01), chunk_size=5),
        Sequential(f"sprt {name} a=b=0.01 k=10 min=30", SPRT(p0, p1, 0.01, 0.01), min_mutants=30),
        Sequential("sprt p0=0.02,p1=0.2 a=b=0.01 k=10", SPRT(0.02, 0.2, 0.01, 0.01)),
        Sequential(f"curtailed t={youden:.3f} k=10", Curtailed(youden)),
    ]


# ------------------------------------------------------------------------------ gate scores
class GateScorer:
    """The bundle's unified classifier of one LCR-using signal set, fed another LCR column.

    Fitted on full LCR; scoring a cheaper LCR with it shows what the gate would lose without
    refitting (refitting on the cheaper LCR can only be as good or better on average).
    """

    def __init__(self, bundle: Bundle, signal_set: str | None) -> None:
        detectors = bundle.detectors
        sets = detectors.signal_sets if detectors is not None else {}
        name = signal_set or (detectors.default_set if detectors is not None else None)
        if name not in sets or not needs_lcr(sets[name].signals):
            name = "cond+lcr" if "cond+lcr" in sets else None
        self.name = name
        if name is None or detectors is None:
            return
        self.signals = sets[name].signals
        self.classifier = load_detector(bundle, sets[name].stem)
        self.cond_detector = (
            load_detector(bundle, detectors.conductance.stem) if "cond" in self.signals else None
        )
        self.cond_inputs = detectors.conductance.inputs
        self.num_classes = int(bundle.manifest["architecture"]["num_classes"])
        self.stored = bundle.read_arrays(SCORES_FILE) if bundle.has_file(SCORES_FILE) else {}
        self._cond: dict[tuple[str, int], np.ndarray] = {}

    def score(self, split: str, features: dict[str, np.ndarray], lcr: np.ndarray) -> np.ndarray:
        """Unified scores of ``split``'s first ``len(lcr)`` images with ``lcr`` as the LCR column."""
        n = len(lcr)
        cond = None
        if self.cond_detector is not None:
            if (split, n) not in self._cond:
                x = conductance_inputs(
                    features["conductance"][:n],
                    features["prediction"][:n],
                    self.cond_inputs,
                    self.num_classes,
                )
                self._cond[(split, n)] = self.cond_detector.decision_function(x)
            cond = self._cond[(split, n)]
        return self.classifier.decision_function(
            signal_matrix(self.signals, features["logits"][:n], cond, lcr)
        )

    def check(self, split: str, features: dict[str, np.ndarray]) -> float | None:
        """Largest difference to the stored scores when fed the stored full LCR (should be ~0)."""
        stored = self.stored.get(scores_key(0, self.name, split))
        if stored is None:
            return None
        return float(np.abs(self.score(split, features, features["lcr"]) - stored).max())


# ------------------------------------------------------------------------------ (a) offline
def part_a(
    features: dict[str, dict[str, np.ndarray]], scorer: GateScorer
) -> tuple[list[dict[str, Any]], dict]:
    """Full LCR, first-n truncations and sequential settings, from stored labels of val and test."""
    val = features["val"]
    total = len(val["mutant_labels"])
    wrong = {s: wrong_labels(features[s]).astype(bool) for s in ("val", "test")}
    ref = {s: auroc(features[s]["lcr"], wrong[s]) for s in ("val", "test")}
    gate_ref = (
        {s: auroc(scorer.score(s, features[s], features[s]["lcr"]), wrong[s]) for s in ("val", "test")}
        if scorer.name
        else {}
    )
    checks = {s: scorer.check(s, features[s]) for s in ("val", "test")} if scorer.name else {}

    def row(
        setting: str, family: str, lcr: dict[str, np.ndarray], used: dict[str, np.ndarray], **extra: Any
    ) -> dict:
        out: dict[str, Any] = {
            "setting": setting,
            "family": family,
            "images": {s: len(wrong[s]) for s in wrong},
            "val_auroc": auroc(lcr["val"], wrong["val"]),
            "test_auroc": auroc(lcr["test"], wrong["test"]),
            "ref_val_auroc": ref["val"],
            "ref_test_auroc": ref["test"],
            "mutants_used_val": float(used["val"].mean()),
            "mutants_used_test": float(used["test"].mean()),
            "forward_equivalents": 1.0 + float(used["val"].mean()),
            "fe_basis": "1 + mean mutants used (val)",
            **extra,
        }
        if scorer.name:
            for s in ("val", "test"):
                out[f"gate_{s}_auroc"] = auroc(scorer.score(s, features[s], lcr[s]), wrong[s])
                out[f"gate_{s}_loss"] = gate_ref[s] - out[f"gate_{s}_auroc"]
        return out

    full_used = {s: np.full(len(wrong[s]), total) for s in wrong}
    rows = [row(f"full LCR ({total} mutants)", "full", {s: features[s]["lcr"] for s in wrong}, full_used)]
    # Anchor: no mutants at all (a constant LCR). If the gate loses little even here, the gate
    # loss column cannot tell settings apart on this bundle.
    constant = {s: np.full(len(wrong[s]), float(val["lcr"].mean())) for s in wrong}
    rows.append(
        row("no mutants (constant LCR)", "anchor", constant, {s: np.zeros(len(wrong[s])) for s in wrong})
    )
    for n in (20, 40):
        if n < total:
            lcr = {
                s: (features[s]["mutant_labels"][:n] != features[s]["prediction"][None, :]).mean(0)
                for s in wrong
            }
            rows.append(
                row(f"first {n} mutants", "first-n", lcr, {s: np.full(len(wrong[s]), n) for s in wrong})
            )
    for setting in sequential_settings(val):
        lcr, used = {}, {}
        for s in wrong:
            lcr[s], used[s] = setting.run(features[s]["mutant_labels"], features[s]["prediction"])
        rows.append(row(setting.name, "sequential", lcr, used, config=setting.to_dict()))
    info = {
        "gate_signal_set": scorer.name,
        "gate_ref_auroc": gate_ref,
        "gate_score_check_max_abs_diff": checks,
    }
    return rows, info


# ------------------------------------------------------------------------------ (b) restricted
def forward_ratio(fn: Callable[[], object], forward: Callable[[], object], repeats: int) -> float:
    """Median over ``repeats`` of ``fn``'s time over the median of 3 forwards just before and 3 just after.

    Interleaving keeps the ratio steady when other processes load the cores unevenly over a run.
    """
    ratios = []
    fn()  # warm-up
    for _ in range(repeats):
        before = timed_runs(forward, repeats=3, warmup=0)
        took = timed_runs(fn, repeats=1, warmup=0)[0]
        after = timed_runs(forward, repeats=3, warmup=0)
        ratios.append(took / statistics.median(before + after))
    return statistics.median(ratios)


def _labels(
    ensemble: Any, x: torch.Tensor, batch_size: int = 256, progress: bool = False, desc: str = ""
) -> np.ndarray:
    starts = range(0, len(x), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    return torch.cat([ensemble.predict(x[i : i + batch_size]) for i in starts], dim=1).numpy()


def part_b(
    bundle: Bundle,
    features: dict[str, dict[str, np.ndarray]],
    scorer: GateScorer,
    modules: list[str],
    rates: list[float] | None,
    n_val: int,
    n_test: int,
    n_accept: int,
    repeats: int,
    progress: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate restricted mutants per rate, label val/test images with them, time them against a forward.

    ``rates`` default to the bundle's rate and twice it: a restricted mutant at the bundle's rate
    changes as many filters as an ordinary one, but all in the later layers.
    """
    model = bundle.load_model()
    info = bundle.get("mutants") or {}
    operator = info.get("operator", "NAI")
    base_rate = float(info.get("rate", 0.005))
    rates = rates or [base_rate, 2 * base_rate]
    full_specs = load_mutants(bundle, model, verify=False).specs
    total = len(full_specs)
    arrays = load_splits(bundle)
    norm = bundle.normalisation
    n_val, n_test = min(n_val, len(arrays["val"])), min(n_test, len(arrays["test"]))
    x = {"val": norm.apply(arrays["val"].images[:n_val]), "test": norm.apply(arrays["test"].images[:n_test])}
    n_accept = min(n_accept, n_val)
    pred = {s: features[s]["prediction"][: len(x[s])] for s in x}
    wrong = {s: pred[s] != features[s]["label"][: len(x[s])] for s in x}
    with torch.no_grad():
        agreement = {s: float((model(x[s][:512]).argmax(1).numpy() == pred[s][:512]).mean()) for s in x}

    # Timing at batch 64, all in this run: plain forward, the bundle's full ensemble (loop, the
    # fast strategy at this batch size), and per rate the restricted ensemble and its prefix alone.
    xb = x["val"][:TIMING_BATCH]

    def forward() -> object:
        with torch.no_grad():
            return model(xb)

    t_forward = median_seconds(forward, repeats=max(5, repeats * 3))
    full_ensemble = MutantEnsemble(model, full_specs, strategy="loop")
    full_fe = forward_ratio(partial(full_ensemble.predict, xb), forward, repeats)

    ref = {s: auroc(features[s]["lcr"][: len(x[s])], wrong[s]) for s in x}
    gate_ref = (
        {s: auroc(scorer.score(s, features[s], features[s]["lcr"][: len(x[s])]), wrong[s]) for s in x}
        if scorer.name
        else {}
    )

    def row(
        setting: str, family: str, scores: dict[str, np.ndarray], fe: float, basis: str, **extra: Any
    ) -> dict:
        out = {
            "setting": setting,
            "family": family,
            "images": {s: len(x[s]) for s in x},
            "val_auroc": auroc(scores["val"], wrong["val"]),
            "test_auroc": auroc(scores["test"], wrong["test"]),
            "ref_val_auroc": ref["val"],
            "ref_test_auroc": ref["test"],
            "forward_equivalents": fe,
            "fe_basis": basis,
            **extra,
        }
        if scorer.name:
            for s in x:
                out[f"gate_{s}_auroc"] = auroc(scorer.score(s, features[s], scores[s]), wrong[s])
                out[f"gate_{s}_loss"] = gate_ref[s] - out[f"gate_{s}_auroc"]
        return out

    rows = [
        row(
            f"full LCR ({total} mutants), same images",
            "full",
            {s: features[s]["lcr"][: len(x[s])] for s in x},
            1.0 + full_fe,
            "1 + measured full ensemble (loop) / forward, batch 64",
            nominal_fe=1.0 + total,
            mutants_used_val=float(total),
        ),
    ]
    name = "+".join(modules)
    split = modules[0] if len(modules) == 1 else None
    details: dict[str, Any] = {
        "modules": modules,
        "operator": operator,
        "acceptance_images": n_accept,
        "prediction_agreement_with_stored": agreement,
        "timing": {
            "batch": TIMING_BATCH,
            "forward_s": t_forward,
            "full_ensemble_fe": full_fe,
        },
        "by_rate": {},
    }
    for rate in rates:
        start = time.perf_counter()
        mutants = generate_mutants_in(
            model,
            operator,
            rate,
            total,
            modules,
            x["val"][:n_accept],
            torch.from_numpy(arrays["val"].labels[:n_accept]),
            seed=0,
            progress=progress,
        )
        generate_s = time.perf_counter() - start
        ensemble = PrefixSharingEnsemble(model, mutants.specs, split)
        labels, lcr = {}, {}
        for s, images in x.items():
            labels[s] = _labels(ensemble, images, progress=progress, desc=f"{name}@{rate} LCR {s}")
            lcr[s] = (labels[s] != pred[s][None, :]).mean(0)
        restricted_fe = forward_ratio(partial(ensemble.predict, xb), forward, repeats)
        with torch.no_grad():
            prefix_fe = forward_ratio(partial(ensemble.prefix, xb), forward, max(5, repeats * 3))
        share = ensemble.suffix_flop_share(xb)
        timing = {
            "restricted_ensemble_fe": restricted_fe,
            "prefix_fe": prefix_fe,
            "suffix_per_mutant_fe": (restricted_fe - prefix_fe) / total,
            "suffix_flop_share": share,
            "flop_nominal_fe": 1.0 + (1.0 - share) + total * share,
        }
        label = f"{name}-restricted @{rate:g} ({mutants.specs[0].n_filters} filters, {total} mutants)"
        rows.append(
            row(
                label,
                "restricted",
                lcr,
                1.0 + timing["restricted_ensemble_fe"],
                "1 + measured restricted ensemble / forward, batch 64",
                nominal_fe=1.0 + (1.0 - share) + total * share,
                mutants_used_val=float(total),
            )
        )
        p0, p1 = val_hypotheses(lcr["val"], wrong["val"], total)
        for alpha in (0.01, 0.001):
            setting = Sequential(
                f"{label} + sprt p0={p0:.3f},p1={p1:.3f} a=b={alpha} k=10", SPRT(p0, p1, alpha, alpha)
            )
            seq, used = {}, {}
            for s in x:
                seq[s], used[s] = setting.run(labels[s], pred[s])
            mean_used = float(used["val"].mean())
            # Live check on the timing batch: the real early-stopping call, prefix once, against forwards.
            pred_b = torch.from_numpy(pred["val"][:TIMING_BATCH])
            live = partial(ensemble.sequential_lcr, xb, pred_b, setting.rule, setting.chunk_size)
            live_used = float(live()[1].float().mean())
            live_fe = forward_ratio(live, forward, repeats)
            rows.append(
                row(
                    setting.name,
                    "restricted+sequential",
                    seq,
                    1.0 + timing["prefix_fe"] + mean_used * timing["suffix_per_mutant_fe"],
                    "1 + measured prefix + mean used x measured suffix per mutant",
                    mutants_used_val=mean_used,
                    mutants_used_test=float(used["test"].mean()),
                    config=setting.to_dict(),
                    live_batch64={"forward_equivalents": 1.0 + live_fe, "mean_mutants_used": live_used},
                )
            )
        details["by_rate"][f"{rate:g}"] = {
            "filters_per_mutant": mutants.specs[0].n_filters,
            "acceptance_rate": mutants.acceptance_rate,
            "attempts": mutants.attempts,
            "kept_accuracy_min": min(mutants.accuracies),
            "original_accuracy": mutants.original_accuracy,
            "generate_seconds": generate_s,
            "mean_lcr": {
                s: {"correct": float(lcr[s][~wrong[s]].mean()), "wrong": float(lcr[s][wrong[s]].mean())}
                for s in x
            },
            "timing": timing,
            "specs": [spec.to_dict() for spec in mutants.specs],
        }
    return rows, details


# ------------------------------------------------------------------------------ report
def decide(rows: list[dict[str, Any]], floor: float) -> None:
    """``adopt_lcr``: judged on the LCR's own val AUROC; ``adopt_gate``: on the gate's (where known).

    Either needs the setting to cost less than the ``floor`` (1 + M forward passes) and at most
    :data:`MAX_FORWARD_EQUIVALENTS`.
    """
    for r in rows:
        r["floor"] = floor
        r["val_loss"] = r["ref_val_auroc"] - r["val_auroc"]
        r["test_loss"] = r["ref_test_auroc"] - r["test_auroc"]
        cheap = (
            r["family"] not in ("full", "anchor")
            and r["forward_equivalents"] <= MAX_FORWARD_EQUIVALENTS
            and r["forward_equivalents"] < r["floor"]
        )
        r["adopt_lcr"] = bool(cheap and r["val_loss"] <= MAX_AUROC_LOSS)
        if "gate_val_loss" in r:
            r["adopt_gate"] = bool(cheap and r["gate_val_loss"] <= MAX_AUROC_LOSS)


def yes(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "no")


def markdown(result: dict[str, Any]) -> str:
    lines = [
        (
            f"Bundle `{result['bundle_id']}`. AUROC: of the LCR alone; loss: full LCR's minus this one's on "
            "the same images; gate: the same for the gate's unified score. Adopt (LCR / gate): val loss <= "
            f"{MAX_AUROC_LOSS} and <= {MAX_FORWARD_EQUIVALENTS:g} forward-equivalents per gated prediction."
        ),
        "",
        (
            "| setting | images val/test | val AUROC | test AUROC | loss val / test | gate loss val / test "
            "| mutants used | fwd-equiv | adopt (LCR / gate) |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        gate = f"{r['gate_val_loss']:+.4f} / {r['gate_test_loss']:+.4f}" if "gate_val_loss" in r else "n/a"
        used = f"{r['mutants_used_val']:.1f}" if "mutants_used_val" in r else "-"
        lines.append(
            f"| {r['setting']} | {r['images']['val']}/{r['images']['test']} | {r['val_auroc']:.4f} | "
            f"{r['test_auroc']:.4f} | {r['val_loss']:+.4f} / {r['test_loss']:+.4f} | {gate} | {used} | "
            f"{r['forward_equivalents']:.1f} | {yes(r.get('adopt_lcr'))} / {yes(r.get('adopt_gate'))} |"
        )
    b = result.get("restricted")
    if b:
        t = b["timing"]
        lines += [
            "",
            f"At batch {t['batch']}: forward {1000 * t['forward_s']:.1f} ms; the bundle's full ensemble "
            + f"{t['full_ensemble_fe']:.1f} fwd-eq.",
        ]
        for rate, r in b["by_rate"].items():
            rt = r["timing"]
            lines.append(
                f"Restricted to {'+'.join(b['modules'])} @{rate} ({r['filters_per_mutant']} filters): "
                f"acceptance {r['acceptance_rate']:.2f} over {r['attempts']} candidates on "
                f"{b['acceptance_images']} val images; suffix FLOP share {rt['suffix_flop_share']:.3f}; "
                f"prefix {rt['prefix_fe']:.2f} fwd-eq, suffix per mutant {rt['suffix_per_mutant_fe']:.3f} "
                f"fwd-eq, whole ensemble {rt['restricted_ensemble_fe']:.1f} fwd-eq (gated prediction by "
                f"FLOPs: {rt['flop_nominal_fe']:.1f} fwd-eq)."
            )
    for r in result["rows"]:
        if "live_batch64" in r:
            live = r["live_batch64"]
            lines.append(
                f"Live early stopping on one batch of 64 val images, {r['setting']}: "
                f"{live['forward_equivalents']:.1f} fwd-eq at {live['mean_mutants_used']:.1f} mutants used."
            )
    if result.get("gate_signal_set"):
        lines.append(
            f"Gate AUROC: the bundle's `{result['gate_signal_set']}` classifier (fitted on full LCR) fed "
            "each setting's LCR; max |score - stored| with full LCR: "
            f"{result['gate_score_check_max_abs_diff']}."
        )
    return "\n".join(lines)


def run_benchmark(
    bundle_path: str | Path,
    *,
    modules: list[str],
    rates: list[float] | None = None,
    n_val: int = 2000,
    n_test: int = 3000,
    n_accept: int = 1000,
    repeats: int = 3,
    signal_set: str | None = None,
    restricted: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    start = time.perf_counter()
    bundle = load_bundle(bundle_path)
    features = load_features(bundle, ("val", "test"))
    if "mutant_labels" not in features["val"]:
        raise SystemExit("the bundle's features have no mutant_labels: build it with mutants")
    scorer = GateScorer(bundle, signal_set)
    rows, info = part_a(features, scorer)
    result: dict[str, Any] = {
        "bundle_id": bundle.manifest.get("bundle_id"),
        "bundle": str(bundle_path),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
        **info,
    }
    if restricted:
        rows_b, details = part_b(
            bundle, features, scorer, modules, rates, n_val, n_test, n_accept, repeats, progress
        )
        rows += rows_b
        result["restricted"] = details
    decide(rows, 1.0 + len(features["val"]["mutant_labels"]))
    result["rows"] = rows
    result["seconds"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.below_floor --bundle B [--images 2000] [--test-images 3000] [--out result.json]``"""
    parser = argparse.ArgumentParser(prog="python -m bench.below_floor", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--images", type=int, default=2000, help="val images for the restricted mutants' LCR")
    parser.add_argument(
        "--test-images", type=int, default=3000, help="test images for the restricted mutants' LCR"
    )
    parser.add_argument("--accept-images", type=int, default=1000, help="val images for the acceptance rule")
    parser.add_argument(
        "--modules", nargs="+", default=["layer3"], help="modules the restricted mutants may touch"
    )
    parser.add_argument(
        "--rates", type=float, nargs="+", help="restricted mutation rates (default: bundle's, 2x)"
    )
    parser.add_argument(
        "--signal-set", help="LCR-using signal set for the gate AUROC (default: the bundle's)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each ensemble (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--no-restricted", action="store_true", help="only (a), from stored features")
    parser.add_argument("--out", help="write the result as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if min(args.images, args.test_images, args.accept_images, args.repeats) < 1:
        parser.error("image counts and repeats must be >= 1")
    result = run_benchmark(
        args.bundle,
        modules=args.modules,
        rates=args.rates,
        n_val=args.images,
        n_test=args.test_images,
        n_accept=args.accept_images,
        repeats=args.repeats,
        signal_set=args.signal_set,
        restricted=not args.no_restricted,
        progress=progress_wanted(args.no_progress),
    )
    return finish(result, "bench.below_floor", argv, args.out, markdown)


if __name__ == "__main__":
    sys.exit(main())

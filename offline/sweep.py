"""Mutation operator x rate sweep: how the choice of mutants changes LCR as an error signal.

The paper's Table 3 compares operators and rates by the LCR of correct and wrong predictions and by
the AUROC of LCR for finding the wrong ones. Here every (operator, rate) gets its own mutant set,
generated with the same acceptance rule as a build (>= 0.9 x the original's accuracy on the first
``acceptance_images`` val images), and LCR is measured on val images after those when val is large
enough, so that the acceptance images do not flatter the mutants. A combination whose acceptance
cap is hit is recorded with its error and acceptance statistics: a rate that destroys the model is
a finding, not a crash.

Rates default to the ones that change 1, about 4 and about 16 filters of the model (the only
numbers that matter on a small CNN, where a rate is rounded to whole filters), plus the paper's
0.1% (NAI on CIFAR-10 ResNet20).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from models.bundle import SWEEP_FILE, WEIGHTS_NAME, Bundle, load_bundle
from models.data import load_splits
from models.errors import ConfigError
from models.lcr import MutantEnsemble, label_change_rate
from models.metrics import auroc
from models.mutant_search import generate_mutants
from models.mutation import (
    MutationError,
    count_filters,
    filters_for_rate,
    get_operator,
    plan_mutant,
)
from models.scores import msp_score
from offline.markdown import fmt

DEFAULT_OPERATORS = ("NAI", "GF", "WS", "NS")
PAPER_RATE = 0.001  # NAI 0.1% on CIFAR-10 ResNet20 (Wu et al., Table 3)
FILTER_TARGETS = (1, 4, 16)  # filters per mutant the default rates aim at


def default_rates(total_filters: int, targets: Sequence[int] = FILTER_TARGETS) -> tuple[float, ...]:
    """Rates that change ``targets`` filters of a model with ``total_filters``, plus the paper's 0.001.

    Each rate is ``k / total`` rounded to two significant digits when that still gives ``k`` filters
    (0.0051 reads better than 0.005102). Where 0.001 changes as many filters as one of them, it
    replaces it: two rates with the same filter count plan the same filters from the same seeds, so
    they would be the same mutants, measured twice.
    """
    if total_filters < 1:
        raise ConfigError(f"total_filters must be >= 1, got {total_filters}")
    by_count: dict[int, float] = {}
    for k in sorted({min(max(1, int(t)), total_filters) for t in targets}):
        exact = k / total_filters
        nice = float(f"{exact:.2g}")
        by_count[k] = nice if max(1, round(nice * total_filters)) == k and nice <= 1.0 else exact
    by_count[max(1, round(PAPER_RATE * total_filters))] = PAPER_RATE
    return tuple(sorted(by_count.values()))


def _lcr_slice(n_val: int, acceptance: int, images: int) -> tuple[int, int, bool]:
    """``(start, stop, overlaps)``: images after the acceptance ones if val holds enough, else the first."""
    if n_val - acceptance >= images:
        return acceptance, acceptance + images, False
    return 0, min(n_val, images), True


def _stats(values: np.ndarray) -> dict[str, float | None]:
    """Mean and (population) std; ``None`` when there are no values, so the JSON stays valid."""
    if values.size == 0:
        return {"mean": None, "std": None}
    return {"mean": float(values.mean()), "std": float(values.std())}


def _acceptance(mutants: Any) -> dict[str, Any]:
    """What a (possibly partial) mutant set says about how the operator and rate hurt accuracy."""
    accs = sorted(mutants.accuracies)
    return {
        "kept": len(mutants.specs),
        "attempts": mutants.attempts,
        "acceptance_rate": mutants.acceptance_rate if mutants.attempts else None,
        "original_accuracy": mutants.original_accuracy,
        "kept_accuracy_min": accs[0] if accs else None,
        "kept_accuracy_median": float(np.median(accs)) if accs else None,
        "candidate_accuracy_median": (
            float(np.median(mutants.candidate_accuracies)) if mutants.candidate_accuracies else None
        ),
    }


def _predict_batched(
    ensemble: MutantEnsemble, x: torch.Tensor, batch_size: int, progress: bool, desc: str
) -> torch.Tensor:
    from tqdm.auto import tqdm

    starts = range(0, len(x), batch_size)
    chunks = [
        ensemble.predict(x[s : s + batch_size])
        for s in tqdm(starts, desc=desc, disable=not progress, leave=False)
    ]
    return torch.cat(chunks, dim=1)


def run_sweep(
    bundle: Bundle,
    operators: Sequence[str] = DEFAULT_OPERATORS,
    rates: Sequence[float] | None = None,
    n_mutants: int = 50,
    images: int = 1000,
    acceptance_images: int = 1000,
    seed: int = 0,
    max_attempts: int | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate mutants per operator and rate, measure their LCR on val, and store the table.

    Parameters
    ----------
    bundle : a bundle with trained weights and recorded splits (val is reloaded from its source).
    operators : mutation operators, see :data:`models.mutation.OPERATORS`.
    rates : mutation rates in (0, 1]; default :func:`default_rates` for the model's filter count.
    n_mutants : mutants kept per combination.
    images : val images for LCR, taken after the acceptance images when val holds enough, else
        the first ones (``lcr_overlaps_acceptance`` says which).
    acceptance_images : the first val images, on which each candidate must keep >= 90% of the
        original's accuracy.
    seed : first candidate seed of every combination (so each uses seeds ``seed, seed + 1, ...``).
    max_attempts : candidates per combination before giving up; default ``10 x n_mutants``.

    Returns
    -------
    The dict written to ``report/sweep_mutants.json``: the settings, the model's accuracy and the
    max-softmax AUROC on the LCR images (a reference), and ``rows``, one per combination, each
    with the acceptance statistics and either the LCR statistics or ``error``.
    """
    for op in operators:
        get_operator(op)
    if n_mutants < 1 or images < 1 or acceptance_images < 1:
        raise ConfigError("n_mutants, images and acceptance_images must all be >= 1")
    model = bundle.load_model()
    total = count_filters(model)
    rates = tuple(float(r) for r in (default_rates(total) if rates is None else rates))
    bad = [r for r in rates if not 0.0 < r <= 1.0]
    if bad:
        raise ConfigError(f"mutation rates must be in (0, 1], got {bad}")

    val = load_splits(bundle)["val"]
    n_acc = min(len(val), acceptance_images)
    start, stop, overlaps = _lcr_slice(len(val), n_acc, images)
    norm = bundle.normalisation
    x_acc, y_acc = norm.apply(val.images[:n_acc]), torch.from_numpy(val.labels[:n_acc]).long()
    x_lcr, y_lcr = norm.apply(val.images[start:stop]), val.labels[start:stop].astype(np.int64)
    with torch.no_grad():
        logits = torch.cat([model(x_lcr[i : i + batch_size]) for i in range(0, len(x_lcr), batch_size)])
    pred = logits.argmax(1)
    wrong = pred.numpy() != y_lcr
    n_wrong = int(wrong.sum())
    msp_auroc = auroc(msp_score(logits.numpy()), wrong) if 0 < n_wrong < len(wrong) else None

    from tqdm.auto import tqdm

    combos = [(op, rate) for op in operators for rate in rates]
    rows: list[dict[str, Any]] = []
    for op, rate in tqdm(combos, desc="sweep", disable=not progress, unit="combination"):
        began = time.perf_counter()
        row: dict[str, Any] = {
            "operator": op,
            "rate": rate,
            "planned_filters": filters_for_rate(model, rate),
            "error": None,
        }
        try:
            # NS rounds up to whole swap pairs; planning can also refuse (no room for the pairs).
            row["planned_filters"] = plan_mutant(model, op, rate, seed).n_filters
            mutants = generate_mutants(
                model,
                op,
                rate,
                n_mutants,
                x_acc,
                y_acc,
                seed=seed,
                max_attempts=max_attempts,
                batch_size=batch_size,
                progress=progress,
            )
        except (MutationError, ConfigError) as exc:
            row["error"] = str(exc)
            partial = getattr(exc, "partial", None)
            if partial is not None:
                row.update(_acceptance(partial))
            row["seconds"] = time.perf_counter() - began
            rows.append(row)
            continue
        row.update(_acceptance(mutants))
        row["filters_per_mutant"] = sorted(set(mutants.filters_per_mutant))
        labels = _predict_batched(
            MutantEnsemble(model, mutants.specs), x_lcr, batch_size, progress, f"LCR {op}@{rate:g}"
        )
        lcr = label_change_rate(labels, pred).numpy().astype(np.float64)
        row["lcr_correct"] = _stats(lcr[~wrong])
        row["lcr_wrong"] = _stats(lcr[wrong])
        row["lcr_mean"] = float(lcr.mean())
        row["lcr_zero_share"] = float((lcr == 0).mean())
        row["auroc"] = auroc(lcr, wrong) if 0 < n_wrong < len(wrong) else None
        row["mutants"] = mutants.to_dict()
        row["seconds"] = time.perf_counter() - began
        rows.append(row)

    sweep = {
        "operators": list(operators),
        "rates": list(rates),
        "n_mutants": n_mutants,
        "seed": seed,
        "max_attempts": max_attempts if max_attempts is not None else 10 * n_mutants,
        "min_relative_accuracy": 0.9,
        "total_filters": total,
        "acceptance_images": [0, n_acc],
        "lcr_images": [start, stop],
        "lcr_overlaps_acceptance": overlaps,
        "val_size": len(val),
        "lcr_accuracy": float(1.0 - wrong.mean()),
        "lcr_wrong": n_wrong,
        "msp_auroc": msp_auroc,
        "rows": rows,
    }
    bundle.write_json(SWEEP_FILE, sweep)
    bundle.save()
    return sweep


def copy_sweep(source: Bundle, target: Bundle) -> None:
    """Put ``source``'s sweep into ``target``'s report: one sweep serves every bundle built on the
    same CNN (e.g. detectors on a held-out fit split and in the paper's setting). Refused unless
    both hold the same weights and the same val images, which the sweep was measured on."""
    if not source.has_file(SWEEP_FILE):
        raise ConfigError(f"{source.path} has no {SWEEP_FILE}: run the sweep there first")
    weights = [b.manifest["files"].get(WEIGHTS_NAME, {}).get("sha256") for b in (source, target)]
    if weights[0] is None or weights[0] != weights[1]:
        raise ConfigError(
            f"{source.path} and {target.path} hold different CNN weights: the sweep does not apply"
        )
    vals = [load_splits(b)["val"] for b in (source, target)]
    if not (
        np.array_equal(vals[0].images, vals[1].images) and np.array_equal(vals[0].labels, vals[1].labels)
    ):
        raise ConfigError(
            f"{source.path} and {target.path} have different val images: the sweep does not apply"
        )
    target.write_json(SWEEP_FILE, source.read_json(SWEEP_FILE))
    target.save()


def _pm(stats: dict[str, float | None] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _filters(row: dict[str, Any]) -> str:
    counts = row.get("filters_per_mutant") or [row["planned_filters"]]
    return "/".join(str(c) for c in counts)


def sweep_markdown(sweep: dict[str, Any]) -> str:
    """The "Mutation operators and rates" report section (the paper's Table 3) from a sweep dict."""
    start, stop = sweep["lcr_images"]
    a0, a1 = sweep["acceptance_images"]
    where = (
        f"the same val images as acceptance ({start}-{stop - 1}: val is too small for a disjoint slice)"
        if sweep["lcr_overlaps_acceptance"]
        else f"val images {start}-{stop - 1}, disjoint from the acceptance images {a0}-{a1 - 1}"
    )
    lines = [
        "## Mutation operators and rates",
        "",
        (
            f"{sweep['n_mutants']} mutants per combination, each kept only with >= "
            f"{sweep['min_relative_accuracy']:g} x the original's accuracy on val images {a0}-{a1 - 1} "
            f"(at most {sweep['max_attempts']} candidates); the model has {sweep['total_filters']} conv "
            f"filters. LCR on {where}: {stop - start} images, {sweep['lcr_wrong']} wrong predictions "
            f"(accuracy {fmt(sweep['lcr_accuracy'], 4)}). LCR is mean ± std (population) over correct and "
            "over wrong predictions; AUROC is LCR's for finding wrong predictions."
        ),
        "",
        (
            "| operator | rate | filters per mutant | acceptance "
            "rate | kept acc. min | LCR correct | LCR wrong | AUROC |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sweep["rows"]:
        if row.get("error"):
            lines.append(
                f"| {row['operator']} | {row['rate']:g} | {_filters(row)} | "
                f"{fmt(row.get('acceptance_rate'), 2)} ({row.get('kept', 0)}/{row.get('attempts', 0)}) | "
                f"{fmt(row.get('kept_accuracy_min'), 4)} | failed | failed | – |"
            )
            continue
        lines.append(
            f"| {row['operator']} | {row['rate']:g} | {_filters(row)} | {fmt(row['acceptance_rate'], 2)} | "
            f"{fmt(row['kept_accuracy_min'], 4)} | {_pm(row['lcr_correct'])} | {_pm(row['lcr_wrong'])} | "
            f"{fmt(row['auroc'], 3)} |"
        )
    lines.append("")
    scored = [r for r in sweep["rows"] if not r.get("error") and r.get("auroc") is not None]
    if scored:
        best = max(scored, key=lambda r: r["auroc"])
        msp = sweep.get("msp_auroc")
        reference = f" (max softmax probability on the same images: {fmt(msp, 3)})" if msp is not None else ""
        lines.append(
            f"Best on val AUROC: **{best['operator']} at rate {best['rate']:g}** ({_filters(best)} filters "
            f"per mutant), AUROC {fmt(best['auroc'], 3)}{reference}."
        )
    else:
        lines.append(
            "No combination gave an AUROC (every one failed, or the images hold no wrong predictions)."
        )
    failed = [r for r in sweep["rows"] if r.get("error")]
    if failed:
        lines += ["", "Failed combinations:"]
        lines += [f"- {row['operator']} at {row['rate']:g}: {row['error']}" for row in failed]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="predgate sweep", description="Mutation operator x rate sweep: LCR statistics and AUROC on val."
    )
    parser.add_argument("--bundle", required=True, help="bundle directory (trained weights and splits)")
    parser.add_argument("--operators", nargs="+", default=list(DEFAULT_OPERATORS), help="mutation operators")
    parser.add_argument(
        "--rates",
        nargs="+",
        type=float,
        default=None,
        help="mutation rates (default: 1, ~4, ~16 filters and 0.001)",
    )
    parser.add_argument("--mutants", type=int, default=50, help="mutants kept per combination")
    parser.add_argument("--images", type=int, default=1000, help="val images for LCR")
    parser.add_argument(
        "--acceptance-images", type=int, default=1000, help="first val images for the acceptance rule"
    )
    parser.add_argument(
        "--max-attempts", type=int, default=None, help="candidates per combination (default 10 x mutants)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 is several times faster on a small, busy machine",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    began = time.perf_counter()
    sweep = run_sweep(
        bundle,
        operators=args.operators,
        rates=args.rates,
        n_mutants=args.mutants,
        images=args.images,
        acceptance_images=args.acceptance_images,
        seed=args.seed,
        max_attempts=args.max_attempts,
        progress=not args.no_progress,
    )
    print(sweep_markdown(sweep))
    print(f"written to {bundle.path / SWEEP_FILE} in {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The evaluation report: every detector and baseline on the same model, splits and metrics.

Everything is recomputed from what the bundle stores (features per split, detector scores per
seed), so a report can be regenerated, and tested against sklearn, without rerunning the model.
This module computes the numbers (``report/metrics.json``), renders them as markdown
(``report/report.md``) and runs the whole report; the figures are drawn from the same numbers by
:mod:`offline.report_figures`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.bundle import (
    REPORT_DIR,
    REPORT_MARKDOWN_FILE,
    REPORT_METRICS_FILE,
    SCORES_FILE,
    SWEEP_FILE,
    Bundle,
    DetectorsSection,
    load_features,
    scores_key,
)
from models.costs import signal_set_cost, stage_costs
from models.errors import BundleError
from models.gate import load_extractor
from models.lcr import label_change_rate
from models.metrics import accuracy_with_fallback, auroc, paired_bootstrap_auroc, summarise, wrong_labels
from models.operating_points import choose_threshold
from models.scores import BASELINE_SCORES
from models.signals import PAPER_SET
from offline.markdown import fit_source, fmt, interval, signed_ci
from offline.report_figures import (
    AUROC_VS_COST_FIGURE,
    CONFUSION_FIGURE,
    FALLBACK_FIGURE,
    LCR_VS_MUTANTS_FIGURE,
    RISK_COVERAGE_FIGURE,
    ROC_FIGURE,
    write_figures,
)
from offline.sweep import sweep_markdown

BASELINES = ("msp", "entropy", "margin", "doctor")
BASELINE_LABELS = {"msp": "MSP", "entropy": "entropy", "margin": "margin", "doctor": "DOCTOR"}
MUTANT_COUNTS = (1, 5, 10, 20, 50, 100)
# Wu, Michel & Briot (arXiv 1910.00387), CIFAR-10 / ResNet20 at 81.9% test accuracy:
# val AUROC, test recall of correct and of wrong predictions at the equal-recall point.
PAPER_CIFAR10 = {
    "conductance": ("conductance", 0.927, 0.863, 0.850),
    "LCR": ("lcr (raw)", 0.887, 0.841, 0.806),
    "NN on both": ("unified NN (cond+lcr)", 0.933, 0.870, 0.861),
}


def method_scores(
    bundle: Bundle, features: dict[str, dict[str, np.ndarray]], seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Scores per method per split: baselines from logits, raw LCR, conductance detector, each
    signal set's chosen classifier, and each unified kind of the paper's set."""
    stored = bundle.read_arrays(SCORES_FILE)
    sets = _detectors(bundle).signal_sets
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in BASELINES:
        out[name] = {
            s: np.asarray(BASELINE_SCORES[name](features[s]["logits"]), dtype=np.float64) for s in features
        }
    if all("lcr" in features[s] for s in features):
        out["lcr (raw)"] = {s: features[s]["lcr"].astype(np.float64) for s in features}
    if (bundle.get("lcr") or {}).get("early_stopping"):  # what stopping early costs in detection
        out["lcr (all mutants)"] = {s: features[s]["lcr_full"].astype(np.float64) for s in features}
    out["conductance"] = {s: stored[scores_key(seed, "conductance-detector", s)] for s in features}
    for name in sets:
        out[f"set {name}"] = {s: stored[scores_key(seed, name, s)] for s in features}
    if PAPER_SET in sets:
        for kind in sets[PAPER_SET].details["val_auroc_by_kind"]:
            unified = {s: stored[scores_key(seed, f"{PAPER_SET}@{kind}", s)] for s in features}
            out[f"unified {kind.upper()} (cond+lcr)"] = unified
    return out


def method_table(
    scores: dict[str, dict[str, np.ndarray]], wrong: dict[str, np.ndarray]
) -> dict[str, dict[str, Any]]:
    """Per method: val AUROC, equal-recall threshold chosen on val, recalls on val and test, and the
    test AUPR-error, FPR at 95% wrong recall and AURC."""
    rows = {}
    for name, by_split in scores.items():
        point = choose_threshold(by_split["val"], wrong["val"], "equal-recall")
        rows[name] = {
            "val": summarise(by_split["val"], wrong["val"], point.threshold),
            "test": summarise(by_split["test"], wrong["test"], point.threshold),
            "threshold": point.threshold,
        }
    return rows


def lcr_vs_mutants(
    features: dict[str, np.ndarray], counts: tuple[int, ...] = MUTANT_COUNTS, draws: int = 20, seed: int = 0
) -> dict[str, list[float]]:
    """Val AUROC of LCR from random subsets of k mutants (mean and std over draws)."""
    wrong = wrong_labels(features)
    total = features["mutant_labels"].shape[0]
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {"count": [], "auroc": [], "std": []}
    for k in [c for c in counts if c <= total]:
        values = []
        for _ in range(draws if k < total else 1):
            subset = np.sort(rng.choice(total, size=k, replace=False))
            mutant_labels = torch.from_numpy(features["mutant_labels"][subset].astype(np.int64))
            values.append(
                auroc(
                    label_change_rate(mutant_labels, torch.from_numpy(features["prediction"])).numpy(), wrong
                )
            )
        out["count"].append(k)
        out["auroc"].append(float(np.mean(values)))
        out["std"].append(float(np.std(values)))
    return out


def evidence_value(
    bundle: Bundle,
    features: dict[str, dict[str, np.ndarray]],
    wrong: dict[str, np.ndarray],
    best_baseline: str,
    costs: dict[str, float] | None,
    n_boot: int,
) -> list[dict[str, Any]]:
    """Per signal set: val/test AUROC, paired-bootstrap difference to the best softmax baseline on
    test (seed 0), its mean and spread across detector seeds, and the measured cost."""
    stored = bundle.read_arrays(SCORES_FILE)
    detectors = _detectors(bundle)
    baseline_test = np.asarray(BASELINE_SCORES[best_baseline](features["test"]["logits"]), dtype=np.float64)
    msp_test = np.asarray(BASELINE_SCORES["msp"](features["test"]["logits"]), dtype=np.float64)
    rows = []
    for name, info in detectors.signal_sets.items():
        # A gain must hold across seeds: each seed's own paired CI, against the best baseline and
        # against MSP (the baseline every figure is set beside); seed 0 gives the headline figures.
        vs_best, vs_msp = {}, {}
        for seed in detectors.seeds:
            scores = stored[scores_key(seed, name, "test")]
            vs_best[seed] = paired_bootstrap_auroc(
                scores, baseline_test, wrong["test"], n_boot=n_boot, seed=seed
            )
            vs_msp[seed] = paired_bootstrap_auroc(scores, msp_test, wrong["test"], n_boot=n_boot, seed=seed)
        per_seed = [b["diff"] for b in vs_best.values()]
        n_seeds = len(detectors.seeds)
        rows.append(
            {
                "signal_set": name,
                "signals": list(info.signals),
                "kind": info.kind,
                "val_auroc": auroc(stored[scores_key(0, name, "val")], wrong["val"]),
                "test_auroc": vs_best[0]["auroc_a"],
                "diff_to_baseline": vs_best[0]["diff"],
                "ci_diff": list(vs_best[0]["ci_diff"]),
                "diff_to_msp": vs_msp[0]["diff"],
                "ci_diff_msp": list(vs_msp[0]["ci_diff"]),
                "seed_diff_mean": float(np.mean(per_seed)),
                "seed_diff_std": float(np.std(per_seed)),
                "seeds_ci_above_0": f"{sum(b['ci_diff'][0] > 0 for b in vs_best.values())}/{n_seeds}",
                "seeds_ci_above_0_msp": f"{sum(b['ci_diff'][0] > 0 for b in vs_msp.values())}/{n_seeds}",
                "cost_fe": signal_set_cost(info.signals, costs) if costs else None,
            }
        )
    return rows


def measure_costs(bundle: Bundle, features_images: np.ndarray, repeats: int = 5) -> dict[str, float]:
    """Forward-equivalents of each evidence stage at batch 64 on this machine (bench code)."""
    extractor = load_extractor(bundle)
    x = bundle.normalisation.apply(features_images[:64])
    return stage_costs(extractor, x, repeats=repeats)


def paper_comparison(
    scores: dict[str, dict[str, np.ndarray]],
    table: dict[str, dict[str, Any]],
    wrong_test: np.ndarray,
    gate_name: str,
    n_boot: int,
) -> list[dict[str, Any]]:
    """The paper's rows next to ours and the softmax baselines: test AUROC with its 95% bootstrap CI
    and the paired difference to MSP (the baseline the paper did not report)."""
    rows = [(label, ours, (auc, rc, rw)) for label, (ours, auc, rc, rw) in PAPER_CIFAR10.items()]
    rows.append((f"gate ({gate_name.removeprefix('set ')}, best kind on val)", gate_name, None))
    rows += [(BASELINE_LABELS[b], b, None) for b in BASELINES]
    out = []
    for label, method, paper in rows:
        if method not in scores:
            continue
        boot = paired_bootstrap_auroc(
            scores[method]["test"], scores["msp"]["test"], wrong_test, n_boot=n_boot, seed=0
        )
        row = table[method]
        out.append(
            {
                "label": label,
                "method": method,
                "paper_val_auroc": paper[0] if paper else None,
                "paper_test_recall_correct": paper[1] if paper else None,
                "paper_test_recall_wrong": paper[2] if paper else None,
                "val_auroc": row["val"]["auroc"],
                "test_auroc": row["test"]["auroc"],
                "test_ci": list(boot["ci_a"]),
                "diff_to_msp": boot["diff"],
                "ci_diff_to_msp": list(boot["ci_diff"]),
                "test_recall_correct": row["test"]["correct_recall"],
                "test_recall_wrong": row["test"]["wrong_recall"],
            }
        )
    return out


def paper_comparison_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of :func:`paper_comparison` (shared by the report and the multi-bundle summary)."""
    lines = [
        (
            "| method | paper val AUROC | ours val AUROC | ours test AUROC [95% CI] | diff to MSP "
            "[95% CI] | paper test recall correct / wrong | ours test recall correct / wrong |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = fmt(r["paper_val_auroc"], 3) if r["paper_val_auroc"] is not None else "–"
        paper_rec = (
            f"{r['paper_test_recall_correct']:.3f} / {r['paper_test_recall_wrong']:.3f}"
            if r["paper_test_recall_correct"] is not None
            else "–"
        )
        lines.append(
            f"| {r['label']} | {paper} | {fmt(r['val_auroc'], 3)} | {fmt(r['test_auroc'], 4)} "
            f"{interval(r['test_ci'])} | {r['diff_to_msp']:+.4f} {signed_ci(r['ci_diff_to_msp'])} | "
            f"{paper_rec} | {fmt(r['test_recall_correct'], 3)} / {fmt(r['test_recall_wrong'], 3)} |"
        )
    return lines


def write_report(
    bundle: Bundle, *, val_images: np.ndarray | None = None, n_boot: int = 1000, progress: bool = True
) -> Path:
    """Compute every number, write ``report/metrics.json``, the PNGs (:mod:`offline.report_figures`)
    and ``report/report.md``."""
    out = bundle.path / REPORT_DIR
    out.mkdir(exist_ok=True)
    features = load_features(bundle)
    wrong = {s: wrong_labels(f) for s, f in features.items()}
    scores = method_scores(bundle, features)
    table = method_table(scores, wrong)
    best_baseline = max(BASELINES, key=lambda b: table[b]["val"]["auroc"])
    detectors = _detectors(bundle)
    default_set = detectors.default_set
    gate_name = f"set {default_set}"
    boot = paired_bootstrap_auroc(
        scores[gate_name]["test"], scores[best_baseline]["test"], wrong["test"], n_boot=n_boot, seed=0
    )
    costs = measure_costs(bundle, val_images) if val_images is not None else None
    evidence = evidence_value(bundle, features, wrong, best_baseline, costs, n_boot)
    curve = lcr_vs_mutants(features["val"]) if "mutant_labels" in features["val"] else None
    paper_rows = paper_comparison(scores, table, wrong["test"], gate_name, n_boot)

    # The gate's verdicts on test at its stored default operating point.
    point = detectors.signal_sets[default_set].operating_points["equal-recall"]
    rejected = scores[gate_name]["test"] > point["threshold"]
    fallback_rows = []
    for name in (gate_name, best_baseline, "conductance", "lcr (raw)"):
        if name in table:
            rej = scores[name]["test"] > table[name]["threshold"]
            fb = accuracy_with_fallback(wrong["test"], rej)
            fallback_rows.append((name, fb["accuracy"], fb["accuracy_with_fallback"], fb["coverage"]))
    confusion = np.array(
        [
            [int((~rejected & (wrong["test"] == 0)).sum()), int((rejected & (wrong["test"] == 0)).sum())],
            [int((~rejected & (wrong["test"] == 1)).sum()), int((rejected & (wrong["test"] == 1)).sum())],
        ]
    )

    metrics = {
        "bundle_id": bundle.manifest["bundle_id"],
        "dataset": bundle.manifest["dataset"]["name"],
        "training": {k: v for k, v in bundle.manifest.get("training", {}).items() if k.endswith("accuracy")},
        "splits": bundle.manifest["splits"]["sizes"],
        "errors": {s: int(w.sum()) for s, w in wrong.items()},
        "methods": table,
        "best_baseline": best_baseline,
        "default_set": default_set,
        "gate_vs_best_baseline": boot,
        "evidence_value": evidence,
        "costs": costs,
        "lcr_vs_mutants": curve,
        "paper_comparison": paper_rows,
        "confusion_test": confusion.tolist(),
        "fallback": [
            dict(zip(("method", "accuracy", "accuracy_with_fallback", "coverage"), r, strict=True))
            for r in fallback_rows
        ],
    }
    (bundle.path / REPORT_METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=float))

    write_figures(out, metrics, scores, wrong["test"])
    markdown = render_markdown(bundle, metrics)
    if bundle.has_file(SWEEP_FILE):
        markdown += "\n" + sweep_markdown(bundle.read_json(SWEEP_FILE))
    (bundle.path / REPORT_MARKDOWN_FILE).write_text(markdown)
    # The server shows the evidence-value table at /v1/bundle.
    bundle.set(
        "detectors", replace(detectors, details={**detectors.details, "evidence_value": evidence}).to_dict()
    )
    for path in sorted(out.iterdir()):
        bundle.record_file(f"{REPORT_DIR}/{path.name}")
    bundle.mark_stage("report")
    return out


def _detectors(bundle: Bundle) -> DetectorsSection:
    detectors = bundle.detectors
    if detectors is None:
        raise BundleError("bundle has no detectors section: the report needs the detectors stage")
    return detectors


def _cond_inputs(detectors: DetectorsSection) -> str:
    if detectors.conductance.inputs == "conductance+class":
        return "**conductance and the predicted class** (one-hot; `--cond-inputs conductance+class`)"
    return "conductance alone (the paper's inputs)"


def _model_lines(man: dict[str, Any]) -> list[str]:
    """The model's provenance and preprocessing, and what the accuracy check said."""
    pre, arch, training = man.get("preprocessing"), man["architecture"], man.get("training", {})
    lines = []
    if pre:
        sources = pre.get("sources", {})
        imported = training.get("imported_from")
        origin = (
            f"weights imported from `{training.get('imported_weights')}` ({imported['format']})"
            if imported
            else "trained by predgate"
        )
        lines.append(
            f"Model: `{arch['name']}` ({arch.get('source', 'builtin')}), {origin}; input "
            f"{pre['channels']} x {pre['input_size'][0]} x {pre['input_size'][1]} (size from "
            f"{sources.get('input_size')}, channels from {sources.get('channels')}), normalised with mean "
            f"{[round(v, 4) for v in pre['mean']]}, std {[round(v, 4) for v in pre['std']]} (from "
            f"{sources.get('mean')})."
        )
    check = training.get("accuracy_check")
    if check and check.get("messages"):
        lines.append(f"**Accuracy check ({check['verdict']}):** " + " ".join(check["messages"]))
    return lines


def render_markdown(bundle: Bundle, m: dict[str, Any]) -> str:
    man = bundle.manifest
    training = man.get("training", {})
    mut = man.get("mutants", {})
    det = _detectors(bundle)
    boot = m["gate_vs_best_baseline"]
    lines = [
        f"# predgate evaluation report: {m['dataset']} ({man['architecture']['name']})",
        "",
        (
            f"Bundle `{m['bundle_id']}`. CNN accuracy: cnn-train {fmt(training.get('cnn-train_accuracy'))}, "
            f"val {fmt(training.get('val_accuracy'))}, test {fmt(training.get('test_accuracy'))}. "
            f"Splits: {', '.join(f'{k} {v}' for k, v in m['splits'].items())}; wrong predictions: "
            f"{', '.join(f'{k} {v}' for k, v in m['errors'].items())}."
        ),
        (
            f"Conductance: layer `{man['conductance']['layer']}`, mode **{man['conductance']['mode']}** "
            "(max relative difference to the 11-point form "
            f"{man['conductance'].get('shortcut_max_rel_diff', float('nan')):.2g}). Detectors trained on "
            f"{fit_source(man)} (unified classifiers on out-of-fold conductance scores); the conductance "
            f"detector reads {_cond_inputs(det)}."
        ),
    ]
    lines += _model_lines(man)
    if mut:
        lines.append(
            f"Mutants: {mut['count']} x {mut['operator']} at rate {mut['rate']} "
            f"({', '.join(map(str, mut['filters_per_mutant']))} of {mut['total_filters']} filters each); "
            f"{mut['attempts']} candidates tried, acceptance rate {mut['acceptance_rate']:.2f} (>= 90% of "
            f"the original's accuracy on {mut['acceptance_images']} val images)."
        )
    stopping = (man.get("lcr") or {}).get("early_stopping")
    if stopping:
        rule, used = stopping["rule"], man["lcr"]["mean_mutants_used"]
        lines.append(
            f"LCR stops early: {rule['rule'].upper()} p0 = {rule['p0']:.4f}, p1 = {rule['p1']:.4f} (mean LCR "
            f"of the fit split's correct / wrong predictions), alpha = {rule['alpha']}, beta = "
            f"{rule['beta']}, chunks of {stopping['chunk_size']} mutants; mean mutants used per image: "
            f"{', '.join(f'{k} {v:.1f}' for k, v in used.items())}. The row `lcr (all mutants)` is the LCR "
            "without stopping."
        )
    diff_ok = boot["ci_diff"][0] > 0
    verdict = (
        f"**The gate beats {m['best_baseline'].upper()}** on test: the 95% CI of the AUROC difference is "
        "above 0."
        if diff_ok
        else f"**The gate does not beat the best softmax baseline ({m['best_baseline'].upper()})** on test: "
        "the 95% CI of the AUROC difference includes or lies below 0."
    )
    lines += [
        "",
        "## Headline",
        "",
        (
            f"Default signal set `{m['default_set']}` vs best softmax baseline `{m['best_baseline']}` "
            f"(chosen on val), test AUROC with {boot['n_boot']} paired bootstrap resamples:"
        ),
        "",
        "| score | test AUROC | 95% CI |",
        "|---|---|---|",
        f"| gate ({m['default_set']}) | {fmt(boot['auroc_a'])} | {interval(boot['ci_a'], 4)} |",
        f"| {m['best_baseline']} | {fmt(boot['auroc_b'])} | {interval(boot['ci_b'], 4)} |",
        f"| difference | {boot['diff']:+.4f} | {signed_ci(boot['ci_diff'])} |",
        "",
        verdict,
        "",
        "## Paper-style table (threshold: equal recall of correct and wrong, chosen on val)",
        "",
        (
            "| method | val AUROC | val recall correct | val recall wrong | test AUROC | test "
            "recall correct | test recall wrong | test AUPR-error | test FPR@95 | test AURC |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in m["methods"].items():
        v, t = row["val"], row["test"]
        lines.append(
            f"| {name} | {fmt(v['auroc'])} | {fmt(v['correct_recall'], 3)} | {fmt(v['wrong_recall'], 3)} | "
            f"{fmt(t['auroc'])} | {fmt(t['correct_recall'], 3)} | {fmt(t['wrong_recall'], 3)} | "
            f"{fmt(t['aupr_error'])} | {fmt(t['fpr_at_95_wrong_recall'])} | {fmt(t['aurc'])} |"
        )
    lines += [
        "",
        "## Side by side with the paper (CIFAR-10, ResNet20, 81.9% test accuracy)",
        "",
        (
            "Recalls at the equal-recall threshold chosen on val; CIs from "
            f"{boot['n_boot']} bootstrap resamples of test, the difference to MSP paired (MSP is not in the "
            "paper)."
        ),
        "",
        *paper_comparison_markdown(m["paper_comparison"]),
        "",
        "## Evidence value: what each signal set is worth and costs",
        "",
        (
            f"Difference = test AUROC minus `{m['best_baseline']}`'s, paired bootstrap 95% CI (seed 0); "
            f"mean and std over {len(det.seeds)} detector seeds; cost in forward-equivalents per image at "
            "batch 64, measured on this machine in the same process."
        ),
        "",
        (
            "| signal set | kind | val AUROC | test AUROC | diff | 95% CI | seeds: mean ± std | "
            "seeds with CI > 0 | diff to MSP [95% CI] | seeds with CI > 0 vs MSP | cost (fwd-eq) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    best_val = max(m["evidence_value"], key=lambda r: r["val_auroc"])
    for r in m["evidence_value"]:
        name = f"**{r['signal_set']}**" if r is best_val else r["signal_set"]
        lines.append(
            f"| {name} | {r['kind']} | {fmt(r['val_auroc'])} | {fmt(r['test_auroc'])} | "
            f"{r['diff_to_baseline']:+.4f} | {signed_ci(r['ci_diff'])} | {r['seed_diff_mean']:+.4f} ± "
            f"{r['seed_diff_std']:.4f} | {r['seeds_ci_above_0']} | {r['diff_to_msp']:+.4f} "
            f"{signed_ci(r['ci_diff_msp'])} | {r['seeds_ci_above_0_msp']} | {fmt(r['cost_fe'], 1)} |"
        )
    holds = best_val["ci_diff"][0] > 0
    lines += [
        "",
        f"Best on val: `{best_val['signal_set']}`. Its gain over `{m['best_baseline']}` "
        + (
            "holds on test (CI above 0)."
            if holds
            else "does **not** hold on test (CI includes or is below 0)."
        ),
        "",
        "## Figures",
        "",
        f"![ROC]({ROC_FIGURE}) ![risk-coverage]({RISK_COVERAGE_FIGURE})",
        "",
        f"![confusion at the operating point]({CONFUSION_FIGURE}) ![fallback accuracy]({FALLBACK_FIGURE})",
        "",
    ]
    if m["lcr_vs_mutants"]:
        c = m["lcr_vs_mutants"]
        lines += [
            "LCR val AUROC against the number of mutants (random subsets, mean ± std): "
            + ", ".join(
                f"{k}: {a:.3f} ± {s:.3f}" for k, a, s in zip(c["count"], c["auroc"], c["std"], strict=True)
            ),
            "",
            f"![LCR vs mutants]({LCR_VS_MUTANTS_FIGURE})",
            "",
        ]
    if m["costs"]:
        lines += [f"![AUROC vs cost]({AUROC_VS_COST_FIGURE})", ""]
    lines += [
        "## Accuracy if every rejected input goes to the fallback (test)",
        "",
        "| method | accuracy | with fallback | coverage |",
        "|---|---|---|---|",
    ]
    for r in m["fallback"]:
        lines.append(
            f"| {r['method']} | {fmt(r['accuracy'])} | {fmt(r['accuracy_with_fallback'])} | "
            f"{fmt(r['coverage'], 3)} |"
        )
    lines += [
        "",
        "## Operating points of the default set (chosen on val)",
        "",
        "| point | threshold | val recall correct | val recall wrong | val coverage | val risk |",
        "|---|---|---|---|---|---|",
    ]
    info = det.signal_sets[m["default_set"]]
    for name, p in info.operating_points.items():
        lines.append(
            f"| {name} | {p['threshold']:.4g} | {fmt(p['correct_recall'], 3)} | {fmt(p['wrong_recall'], 3)} "
            f"| {fmt(p['coverage'], 3)} | {fmt(p['risk'], 4)} |"
        )
    for name, why in info.details.get("skipped_points", {}).items():
        lines.append(f"| {name} | not stored: {why} | | | | |")
    return "\n".join(lines) + "\n"

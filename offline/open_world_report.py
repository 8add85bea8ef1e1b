"""Figures of the open-world evaluation per regime, against MSP and DOCTOR on the same inputs.

Regimes and what "positive" (to be rejected) means in each:

- ``clean``: the test images; positive = the CNN is wrong;
- ``shift-sN``: every evaluation corruption at severity N pooled; positive = the CNN is wrong;
- ``unknown-NAME``: the clean images and one unknown set; positive = unknown (the AUROC of
  "unknown vs clean"), the acceptance figures count any accepted unknown input as an error;
- ``unknown-far`` / ``unknown-near``: the same with the far / near unknown sets pooled;
- ``mixed``: clean images and as many unknown ones; positive = wrong or unknown.

For each (variant, signal set): AUROC, AURC and FPR at 95% TPR (mean over detector seeds), the paired
bootstrap CI of the AUROC difference to MSP and to DOCTOR (raw softmax scores of the same logits)
for every seed, and at the set's operating points (chosen on the variant's val rows): coverage,
accuracy among accepted inputs and MSP's accuracy at the same coverage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from models.bundle import OPEN_WORLD_REPORT
from models.metrics import aurc, auroc, fpr_at_wrong_recall, paired_bootstrap_auroc
from models.scores import doctor, msp_score
from models.signals import CANDIDATE_SETS, OPEN_WORLD_SETS, PAPER_SET
from offline.open_world import OpenWorldResult

SHOWN_SETS = (
    "msp",
    "doctor",
    "energy",
    "maxlogit",
    "pnorm",
    "relu",
    "doctor_pert",
    "maha",
    "knn",
    "cond",
    "lcr",
    PAPER_SET,
    "all",
    "msp+maha+knn",
    "feat+softmax",
    "cond+feat+softmax",
    "cond+lcr+maha+knn",
    "everything",
)


def _regimes(result: OpenWorldResult) -> dict[str, dict[str, Any]]:
    """Regime name -> the suites it pools and whether "positive" is unknown-vs-clean."""
    suites = result.suites
    out: dict[str, dict[str, Any]] = {"clean": {"suites": ["clean"], "unknown_only": False}}
    severities = sorted({s["severity"] for s in suites.values() if s["regime"] == "shift"})
    for sev in severities:
        names = [n for n, s in suites.items() if s["regime"] == "shift" and s["severity"] == sev]
        out[f"shift-s{sev}"] = {"suites": names, "unknown_only": False}
    unknown = [n for n, s in suites.items() if s["regime"] == "unknown"]
    for name in unknown:
        out[f"unknown-{name}"] = {"suites": ["clean", name], "unknown_only": True}
    for group in ("far", "near"):
        names = [n for n in unknown if suites[n]["kind"] == group]
        if names:
            out[f"unknown-{group}"] = {"suites": ["clean", *names], "unknown_only": True}
    if "mixed" in suites:
        out["mixed"] = {"suites": ["mixed"], "unknown_only": False}
    return out


def _pool(result: OpenWorldResult, names: list[str], key: Any) -> np.ndarray:
    return np.concatenate([result.scores[n][key] for n in names])


def _labels(result: OpenWorldResult, names: list[str], unknown_only: bool) -> tuple[np.ndarray, np.ndarray]:
    label = np.concatenate([result.suites[n]["label"] for n in names])
    pred = np.concatenate([result.suites[n]["prediction"] for n in names])
    error = (label != pred).astype(np.int64)  # unknown (-1) is never predicted: always an error
    positive = (label < 0).astype(np.int64) if unknown_only else error
    return positive, error


def _accept_stats(
    scores: np.ndarray, threshold: float, error: np.ndarray, msp: np.ndarray
) -> dict[str, float]:
    accepted = scores <= threshold
    n_acc = int(accepted.sum())
    coverage = n_acc / len(scores)
    acc = float(1 - error[accepted].mean()) if n_acc else float("nan")
    order = np.argsort(msp, kind="stable")[:n_acc]  # MSP accepting as many inputs, most confident first
    acc_msp = float(1 - error[order].mean()) if n_acc else float("nan")
    return {
        "coverage": coverage,
        "accuracy_accepted": acc,
        "msp_accuracy_same_coverage": acc_msp,
        "accepted": n_acc,
    }


def regime_table(
    result: OpenWorldResult, *, n_boot: int = 200, sets: tuple[str, ...] = SHOWN_SETS
) -> dict[str, Any]:
    """Every figure of the module docstring, per regime, variant and set."""
    out: dict[str, Any] = {}
    variants = list(result.variants)
    for regime, spec in _regimes(result).items():
        names, unknown_only = spec["suites"], spec["unknown_only"]
        positive, error = _labels(result, names, unknown_only)
        if positive.min() == positive.max():
            continue
        logits = np.concatenate([result.suites[n]["logits"] for n in names])
        baselines = {"msp": msp_score(logits), "doctor": doctor(logits)}
        rows: dict[str, Any] = {
            "n": len(positive),
            "n_positive": int(positive.sum()),
            "accuracy": float(
                1 - error[np.concatenate([result.suites[n]["label"] for n in names]) >= 0].mean()
            )
            if (np.concatenate([result.suites[n]["label"] for n in names]) >= 0).any()
            else None,
            "baselines": {
                b: {
                    "auroc": auroc(s, positive),
                    "aurc": aurc(s, positive),
                    "fpr95": fpr_at_wrong_recall(s, positive, 0.95),
                }
                for b, s in baselines.items()
            },
            "sets": {},
        }
        for variant in variants:
            vf = result.variants[variant]
            for name in sets:
                if name not in vf.fits[0].sets:
                    continue
                per_seed = []
                for fit in vf.fits:
                    s = _pool(result, names, (variant, fit.seed, name))
                    entry: dict[str, Any] = {
                        "auroc": auroc(s, positive),
                        "aurc": aurc(s, positive),
                        "fpr95": fpr_at_wrong_recall(s, positive, 0.95),
                    }
                    for base, b in baselines.items():
                        boot = paired_bootstrap_auroc(s, b, positive, n_boot=n_boot, seed=fit.seed)
                        entry[f"diff_{base}"] = boot["diff"]
                        entry[f"ci_{base}"] = list(boot["ci_diff"])
                    entry["points"] = {
                        p: _accept_stats(s, op.threshold, error, baselines["msp"])
                        for p, op in vf.points.get((fit.seed, name), {}).items()
                    }
                    per_seed.append(entry)
                rows["sets"][f"{variant}/{name}"] = {
                    "auroc": float(np.mean([e["auroc"] for e in per_seed])),
                    "aurc": float(np.mean([e["aurc"] for e in per_seed])),
                    "fpr95": float(np.mean([e["fpr95"] for e in per_seed])),
                    "diff_msp": float(np.mean([e["diff_msp"] for e in per_seed])),
                    "diff_doctor": float(np.mean([e["diff_doctor"] for e in per_seed])),
                    "seeds_above_msp": sum(e["ci_msp"][0] > 0 for e in per_seed),
                    "seeds_above_doctor": sum(e["ci_doctor"][0] > 0 for e in per_seed),
                    "seeds_below_msp": sum(e["ci_msp"][1] < 0 for e in per_seed),
                    "per_seed": per_seed,
                }
        out[regime] = rows
    return out


def set_costs(result: OpenWorldResult, n_mutants_used: float | None) -> dict[str, float]:
    """Forward-equivalents per image of each set: the forward pass (which also gives the shortcut
    conductance and the penultimate features), plus LCR's mutants, plus ~3 for the perturbation
    (a backward pass is about two forwards, then the second forward)."""
    out = {}
    for name, signals in {**CANDIDATE_SETS, **OPEN_WORLD_SETS}.items():
        cost = 1.0
        if "lcr" in signals and n_mutants_used is not None:
            cost += n_mutants_used
        if "doctor_pert" in signals:
            cost += 3.0
        out[name] = cost
    return out


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def _diff(row: dict[str, Any], base: str) -> str:
    seed0 = row["per_seed"][0]
    lo, hi = seed0[f"ci_{base}"]
    above, n = row[f"seeds_above_{base}"], len(row["per_seed"])
    return f"{row[f'diff_{base}']:+.4f} [{lo:+.4f}, {hi:+.4f}] ({above}/{n})"


def best_sets(table: dict[str, Any], costs: dict[str, float], cheap: float) -> dict[str, dict[str, str]]:
    """Per regime: the set with the highest AUROC at any cost and at the cost of MSP (one forward)."""
    out = {}
    for regime, rows in table.items():
        sets = rows["sets"]
        any_cost = max(sets, key=lambda k: sets[k]["auroc"])
        cheap_sets = [k for k in sets if costs.get(k.split("/", 1)[1], 1e9) <= cheap]
        equal = max(cheap_sets, key=lambda k: sets[k]["auroc"]) if cheap_sets else None
        out[regime] = {"any_cost": any_cost, "equal_cost": equal}
    return out


def choose_default(table: dict[str, Any], costs: dict[str, float], budget: float) -> dict[str, Any]:
    """The set (and variant) with the best mean AUROC over the regimes clean, shift (mean over
    severities), unknown (far and near) and mixed, among sets costing at most ``budget``."""
    groups = {
        "clean": ["clean"],
        "shift": [r for r in table if r.startswith("shift-")],
        "unknown": [r for r in ("unknown-far", "unknown-near") if r in table],
        "mixed": ["mixed"] if "mixed" in table else [],
    }
    keys = set.intersection(*(set(table[r]["sets"]) for g in groups.values() for r in g))
    scored = {}
    for key in keys:
        name = key.split("/", 1)[1]
        if costs.get(name, 1e9) > budget:
            continue
        means = [np.mean([table[r]["sets"][key]["auroc"] for r in g]) for g in groups.values() if g]
        scored[key] = float(np.mean(means))
    ranked = sorted(scored, key=lambda k: -scored[k])
    return {"chosen": ranked[0] if ranked else None, "ranking": [(k, scored[k]) for k in ranked]}


def plot_shift(table: dict[str, Any], accuracy_clean: float, sets: list[str], path: Path) -> None:
    """Accuracy among accepted inputs (equal-recall point) against severity, with MSP at the same
    coverage beside each set, and AUROC against severity."""
    regimes = sorted((r for r in table if r.startswith("shift-s")), key=lambda r: int(r[7:]))
    sev = [0] + [int(r[7:]) for r in regimes]
    order = ["clean", *regimes]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    for key in sets:
        if key not in table["clean"]["sets"]:
            continue
        acc = [
            np.mean(
                [
                    e["points"].get("equal-recall", {}).get("accuracy_accepted", np.nan)
                    for e in table[r]["sets"][key]["per_seed"]
                ]
            )
            for r in order
        ]
        msp = [
            np.mean(
                [
                    e["points"].get("equal-recall", {}).get("msp_accuracy_same_coverage", np.nan)
                    for e in table[r]["sets"][key]["per_seed"]
                ]
            )
            for r in order
        ]
        line = ax1.plot(sev, acc, marker="o", label=key)[0]
        ax1.plot(sev, msp, ls=":", color=line.get_color(), lw=1)
        ax2.plot(sev, [table[r]["sets"][key]["auroc"] for r in order], marker="o", label=key)
    ax2.plot(sev, [table[r]["baselines"]["msp"]["auroc"] for r in order], color="black", ls="--", label="MSP")
    ax1.axhline(accuracy_clean, color="grey", ls="--", lw=1, label="CNN, clean, no gate")
    ax1.plot(sev, [table[r]["accuracy"] for r in order], color="black", lw=1, label="CNN, no gate")
    ax1.set_xlabel("corruption severity (0 = clean)")
    ax1.set_ylabel("accuracy among accepted (dotted: MSP, same coverage)")
    ax2.set_xlabel("corruption severity (0 = clean)")
    ax2.set_ylabel("AUROC, wrong vs right")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_unknown(table: dict[str, Any], sets: list[str], path: Path) -> None:
    regimes = [r for r in table if r.startswith("unknown-")]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / (len(sets) + 1)
    x = np.arange(len(regimes))
    ax.bar(x, [table[r]["baselines"]["msp"]["auroc"] for r in regimes], width, label="MSP", color="black")
    for i, key in enumerate(sets, start=1):
        ax.bar(
            x + i * width,
            [table[r]["sets"].get(key, {}).get("auroc", np.nan) for r in regimes],
            width,
            label=key,
        )
    ax.set_xticks(x + width * len(sets) / 2, [r[8:] for r in regimes], fontsize=8)
    ax.set_ylabel("AUROC, unknown vs clean")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kind_table(
    result: OpenWorldResult, keys: list[str], severities: tuple[int, ...] = (3, 5)
) -> list[dict[str, Any]]:
    """Per corruption kind and severity (seed 0): error-detection AUROC of MSP and of each ``keys``
    set, and each set's accuracy among accepted inputs at its equal-recall point beside MSP's at the
    same coverage: where a regime's pooled figure could hide one kind that fails."""
    rows = []
    for name, suite in result.suites.items():
        if suite["regime"] != "shift" or suite["severity"] not in severities:
            continue
        error = (suite["label"] != suite["prediction"]).astype(np.int64)
        if error.min() == error.max():
            continue
        msp = msp_score(suite["logits"])
        row: dict[str, Any] = {"suite": name, "accuracy": float(1 - error.mean()), "msp": auroc(msp, error)}
        for key in keys:
            variant, set_name = key.split("/", 1)
            score_key = (variant, 0, set_name)
            if score_key not in result.scores[name]:
                continue
            scores = result.scores[name][score_key]
            point = result.variants[variant].points.get((0, set_name), {}).get("equal-recall")
            stats = _accept_stats(scores, point.threshold, error, msp) if point is not None else {}
            row[key] = {"auroc": auroc(scores, error), **stats}
        rows.append(row)
    return rows


def render(result: OpenWorldResult, table: dict[str, Any], costs: dict[str, float], bundle_id: str) -> str:
    best = best_sets(table, costs, cheap=1.0)
    default = choose_default(table, costs, budget=costs.get(PAPER_SET, 1e9))
    lines = [
        f"# Open-world report: {bundle_id}",
        "",
        (
            f"Settings: {json.dumps(result.settings)}. Clean test "
            f"accuracy of the CNN: {result.accuracy_clean:.4f}."
        ),
        (
            "Variants: `clean` = detectors fitted on the clean fit "
            "split, thresholds on clean val; `exposed` = fit and"
        ),
        (
            "val also hold the exposure rows (fit/val images under "
            "corruptions of other kinds than the evaluated ones,"
        ),
        "plus pixel- and patch-shuffled outliers). No regime below uses an exposure kind.",
        (
            "Differences are AUROC(set) - AUROC(baseline) on the "
            "same inputs, mean over detector seeds; the interval is"
        ),
        "seed 0's paired bootstrap 95% CI; (k/n) counts the seeds whose CI lies above 0.",
        "",
        "## Best set per regime",
        "",
        (
            "| regime | n (positive) | MSP | DOCTOR | best set, any cost | AUROC "
            "| vs MSP | vs DOCTOR | best at MSP's cost (1 fwd) | AUROC | vs MSP |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for regime, rows in table.items():
        b = best[regime]
        a = rows["sets"][b["any_cost"]]
        e = rows["sets"].get(b["equal_cost"]) if b["equal_cost"] else None
        lines.append(
            f"| {regime} | {rows['n']} ({rows['n_positive']}) | {rows['baselines']['msp']['auroc']:.4f} | "
            f"{rows['baselines']['doctor']['auroc']:.4f} | `{b['any_cost']}` | {a['auroc']:.4f} | "
            f"{_diff(a, 'msp')} | {_diff(a, 'doctor')} | `{b['equal_cost']}` | "
            f"{_fmt(e['auroc'] if e else None)} | {_diff(e, 'msp') if e else '-'} |"
        )
    shown = [("MSP", None), ("DOCTOR", None), (f"clean/{PAPER_SET}", f"clean/{PAPER_SET}")]
    if default["chosen"] is not None and default["chosen"] != f"clean/{PAPER_SET}":
        shown.append((default["chosen"], default["chosen"]))
    lines += [
        "",
        "## AURC and FPR at 95% TPR per regime (lower is better; mean over seeds)",
        "",
        "| regime | " + " | ".join(f"{label} AURC | {label} FPR95" for label, _ in shown) + " |",
        "| --- | " + " | ".join("--- | ---" for _ in shown) + " |",
    ]
    for regime, rows in table.items():
        cells = []
        for label, key in shown:
            row = rows["baselines"][label.lower()] if key is None else rows["sets"].get(key)
            cells += [_fmt(row["aurc"]) if row else "-", _fmt(row["fpr95"], 3) if row else "-"]
        lines.append(f"| {regime} | " + " | ".join(cells) + " |")
    paper_rows = [(r, rows["sets"].get(f"clean/{PAPER_SET}")) for r, rows in table.items()]
    lines += [
        "",
        f"## The paper's gate (`{PAPER_SET}`, clean variant) against MSP",
        "",
        (
            "| regime | AUROC | MSP | vs MSP | coverage "
            "(equal-recall) | accuracy accepted | MSP, same coverage |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for regime, row in paper_rows:
        if row is None:
            continue
        pts = row["per_seed"][0]["points"].get("equal-recall", {})
        lines.append(
            f"| {regime} | {row['auroc']:.4f} | {table[regime]['baselines']['msp']['auroc']:.4f} | "
            f"{_diff(row, 'msp')} | {_fmt(pts.get('coverage'), 3)} | {_fmt(pts.get('accuracy_accepted'), 3)} "
            f"| {_fmt(pts.get('msp_accuracy_same_coverage'), 3)} |"
        )
    lines += ["", "## Every set, AUROC per regime (mean over seeds)", ""]
    regimes = list(table)
    lines.append("| set | cost (fwd-eq) | " + " | ".join(regimes) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in regimes) + " |")
    lines.append(
        "| MSP | 1 | " + " | ".join(f"{table[r]['baselines']['msp']['auroc']:.3f}" for r in regimes) + " |"
    )
    lines.append(
        "| DOCTOR | 1 | "
        + " | ".join(f"{table[r]['baselines']['doctor']['auroc']:.3f}" for r in regimes)
        + " |"
    )
    keys = sorted(
        {k for r in regimes for k in table[r]["sets"]},
        key=lambda k: (
            k.split("/")[0],
            SHOWN_SETS.index(k.split("/")[1]) if k.split("/")[1] in SHOWN_SETS else 99,
        ),
    )
    for key in keys:
        cells = [f"{table[r]['sets'][key]['auroc']:.3f}" if key in table[r]["sets"] else "-" for r in regimes]
        lines.append(
            f"| `{key}` | {costs.get(key.split('/', 1)[1], float('nan')):.1f} | " + " | ".join(cells) + " |"
        )
    per_kind = [f"clean/{PAPER_SET}"] + ([default["chosen"]] if default["chosen"] else [])
    lines += [
        "",
        "## Per corruption kind, severities 3 and 5 (seed 0)",
        "",
        "AUROC of wrong vs right; acc = accuracy among accepted inputs at the set's equal-recall point,",
        "MSP acc = MSP's at the same coverage.",
        "",
        "| suite | CNN accuracy | MSP AUROC | "
        + " | ".join(f"`{k}` AUROC | coverage | acc | MSP acc" for k in per_kind)
        + " |",
        "| --- | --- | --- | " + " | ".join("--- | --- | --- | ---" for _ in per_kind) + " |",
    ]
    for row in kind_table(result, per_kind):
        cells = []
        for key in per_kind:
            e = row.get(key)
            cells += (
                [
                    _fmt(e["auroc"]),
                    _fmt(e.get("coverage"), 3),
                    _fmt(e.get("accuracy_accepted"), 3),
                    _fmt(e.get("msp_accuracy_same_coverage"), 3),
                ]
                if e
                else ["-"] * 4
            )
        lines.append(
            f"| {row['suite']} | {row['accuracy']:.3f} | {row['msp']:.4f} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "## Severity >= 3: accuracy among accepted inputs at the equal-recall point",
        "",
        (
            "Target: above the bare CNN's clean accuracy "
            f"({result.accuracy_clean:.4f}) while MSP at the same coverage is not."
        ),
        "",
        "| regime | set | coverage | accuracy accepted | MSP, same coverage |",
        "| --- | --- | --- | --- | --- |",
    ]
    for regime in [r for r in table if r.startswith("shift-s") and int(r[7:]) >= 3]:
        for key in (f"clean/{PAPER_SET}", f"exposed/{PAPER_SET}", default["chosen"]):
            if key is None or key not in table[regime]["sets"]:
                continue
            seeds = table[regime]["sets"][key]["per_seed"]
            pts = [e["points"].get("equal-recall", {}) for e in seeds]
            lines.append(
                f"| {regime} | `{key}` | {np.mean([p.get('coverage', np.nan) for p in pts]):.3f} | "
                f"{np.mean([p.get('accuracy_accepted', np.nan) for p in pts]):.3f} | "
                f"{np.mean([p.get('msp_accuracy_same_coverage', np.nan) for p in pts]):.3f} |"
            )
    lines += [
        "",
        "## What exposure costs on clean data",
        "",
        "The exposed variant chooses its thresholds on a val mix with exposure rows; on clean test images:",
        "",
        (
            "| set | variant | clean AUROC | coverage (equal-recall) "
            "| accuracy accepted | risk=0.02@0.95 coverage |"
        ),
        "| --- | --- | --- | --- | --- | --- |",
    ]
    compared = [PAPER_SET] + ([default["chosen"].split("/", 1)[1]] if default["chosen"] else [])
    for name in dict.fromkeys(compared):
        for variant in ("clean", "exposed"):
            row = table.get("clean", {}).get("sets", {}).get(f"{variant}/{name}")
            if row is None:
                continue
            seeds = [e["points"] for e in row["per_seed"]]
            eq = [p.get("equal-recall", {}) for p in seeds]
            rk = [p.get("risk=0.02@0.95", {}) for p in seeds]
            lines.append(
                f"| `{name}` | {variant} | {row['auroc']:.4f} | "
                f"{np.nanmean([p.get('coverage', np.nan) for p in eq]):.3f} | "
                f"{np.nanmean([p.get('accuracy_accepted', np.nan) for p in eq]):.3f} | "
                f"{_fmt(float(np.nanmean([p.get('coverage', np.nan) for p in rk])) if any(rk) else None, 3)} "
                "|"
            )
    lines += [
        "",
        "## Risk bound under shift",
        "",
        "`risk=0.02@0.95` was chosen on the variant's val rows; the observed risk among accepted inputs:",
        "",
        "| regime | set | coverage | observed risk |",
        "| --- | --- | --- | --- |",
    ]
    for regime in table:
        for key in (f"clean/{PAPER_SET}", f"exposed/{PAPER_SET}", default["chosen"]):
            if key is None or key not in table[regime]["sets"]:
                continue
            pt = table[regime]["sets"][key]["per_seed"][0]["points"].get("risk=0.02@0.95")
            if pt:
                lines.append(
                    f"| {regime} | `{key}` | {pt['coverage']:.3f} | {1 - pt['accuracy_accepted']:.3f} |"
                    if pt["accepted"]
                    else f"| {regime} | `{key}` | 0.000 | - |"
                )
    lines += [
        "",
        "## Default chosen by evidence",
        "",
        (
            "Among sets costing at most the paper's gate "
            f"({costs.get(PAPER_SET, float('nan')):.1f} forward-equivalents),"
        ),
        (
            "ranked by the mean of the regime-group AUROCs (clean; "
            "shift, mean over severities; unknown, far and near; mixed):"
        ),
        "",
    ]
    for key, value in default["ranking"][:10]:
        lines.append(f"- `{key}`: {value:.4f} (cost {costs.get(key.split('/', 1)[1], float('nan')):.1f})")
    lines += [
        "",
        "Open-set scorers: "
        + json.dumps(result.scorers.get("pnorm"))
        + ", rel-u "
        + json.dumps(result.scorers.get("relu"))
        + ", perturbation "
        + json.dumps(result.scorers.get("perturbation")),
        (
            f"Measured per image (2 CPU cores, batch 256): gate evidence {result.costs['gate_ms']:.2f} ms, "
            f"penultimate features {result.costs['penultimate_ms']:.2f} ms, perturbation "
            f"{result.costs['perturbation_ms']:.2f} ms."
        ),
        "",
        f"![shift]({OPEN_WORLD_REPORT['shift_plot']})",
        "",
        f"![unknown]({OPEN_WORLD_REPORT['unknown_plot']})",
        "",
    ]
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def write_open_world_report(
    result: OpenWorldResult,
    out_dir: Path,
    bundle_id: str,
    n_mutants_used: float | None,
    *,
    n_boot: int = 200,
) -> dict[str, Any]:
    """Markdown, JSON and two PNGs into ``out_dir``; returns the regime table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = regime_table(result, n_boot=n_boot)
    costs = set_costs(result, n_mutants_used)
    default = choose_default(table, costs, budget=costs.get(PAPER_SET, 1e9))
    shown = [f"clean/{PAPER_SET}", f"exposed/{PAPER_SET}"] + (
        [default["chosen"]] if default["chosen"] else []
    )
    plot_shift(table, result.accuracy_clean, shown, out_dir / OPEN_WORLD_REPORT["shift_plot"])
    plot_unknown(
        table,
        [f"clean/{PAPER_SET}", "clean/maha", "clean/knn", "clean/energy"]
        + ([default["chosen"]] if default["chosen"] else []),
        out_dir / OPEN_WORLD_REPORT["unknown_plot"],
    )
    (out_dir / OPEN_WORLD_REPORT["markdown"]).write_text(render(result, table, costs, bundle_id))
    summary = {
        "settings": result.settings,
        "accuracy_clean": result.accuracy_clean,
        "costs": costs,
        "measured_ms": result.costs,
        "scorers": result.scorers,
        "default": default,
        "best": best_sets(table, costs, cheap=1.0),
        "regimes": {r: {k: v for k, v in rows.items()} for r, rows in table.items()},
    }
    (out_dir / OPEN_WORLD_REPORT["json"]).write_text(json.dumps(_jsonable(summary), indent=1, default=str))
    return table

"""``predgate robustness``: every signal set of a bundle on its adversarial images, against MSP.

    predgate robustness --bundle bundles/fashion-mnist-quick

For each attack stored by ``predgate attack`` (``adversarial/<tag>/``), the gate's evidence of the
rounded adversarial images is computed by the bundle's own extractor (the server's code, the
bundle's early-stopping LCR rule) and cached beside them (``evidence.npz``); every stored signal set
then scores clean and adversarial rows with its fitted classifier, and the report gives:

- the attack's success rate (share of correctly classified test images it fools);
- ``adv-vs-clean``: AUROC of successful adversarial vs. clean correctly classified inputs (Wang et
  al.'s setting), paired bootstrap 95% CI of the difference to MSP;
- ``wrong-vs-correct``: clean and adversarial rows together, wrong for any reason vs. correct;
- per operating point: rejection rate of successful adversarial and of clean correct inputs, and
  the accuracy among accepted inputs of the clean + adversarial mix.

Written to ``BUNDLE/report/robustness.md`` (+ ``robustness.json``, ``robustness.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from models.bundle import (
    ADVERSARIAL_DIR,
    REPORT_DIR,
    ROBUSTNESS_FILE,
    ROBUSTNESS_MARKDOWN_FILE,
    Bundle,
    adversarial_evidence_file,
    load_bundle,
    load_features,
)
from models.data import ImageArrays, load_splits
from models.gate import Gate, load_early_stopping, load_gate
from models.metrics import auroc, paired_bootstrap_auroc
from models.signals import OPEN_WORLD_SIGNALS, signal_matrix
from offline.attack import load_adversarial
from offline.features import apply_early_stopping, extract_features

log = logging.getLogger("predgate.robustness")

# Wang et al. (ICSE 2019, arXiv 1812.05793), AUROC adversarial vs. clean, best mutation operator.
WANG_ANCHORS = {
    "MNIST (LeNet)": {"fgsm": 0.965, "cw-l2": 0.958, "deepfool": 0.986, "square": 0.969, "jsma": 0.996},
    "CIFAR-10 (GoogLeNet)": {
        "fgsm": 0.900,
        "cw-l2": 0.926,
        "deepfool": 0.977,
        "square": 0.871,
        "jsma": 0.976,
    },
}
BASELINE = "msp"


def evidence_of(
    bundle: Bundle, gate: Gate, tag: str, images: int | None, progress: bool
) -> dict[str, np.ndarray]:
    """The gate's evidence of ``tag``'s rounded adversarial images (cached in the bundle)."""
    adv = load_adversarial(bundle, tag, images)
    name = adversarial_evidence_file(tag)
    if bundle.has_file(name) and (bundle.path / name).exists():
        cached = bundle.read_arrays(name)
        if len(cached["index"]) == len(adv["index"]) and np.array_equal(cached["index"], adv["index"]):
            return cached
    test = load_splits(bundle)["test"]
    arrays = ImageArrays(adv["images"], test.labels[adv["index"]], bundle.class_names)
    feats = extract_features(
        gate.extractor,
        bundle.normalisation,
        arrays,
        with_lcr=gate.extractor.ensemble is not None,
        progress=progress,
        desc=f"evidence {tag}",
    )
    feats["index"] = adv["index"]
    bundle.write_arrays(name, feats)
    bundle.save()
    return feats


def set_scores(gate: Gate, name: str, table: dict[str, np.ndarray]) -> np.ndarray:
    """Signal set ``name``'s unified score of every row, as :meth:`Gate.run` computes it."""
    chosen = gate.signal_set(name)
    cond = gate.cond_score(table["conductance"].astype(np.float64), table["prediction"], chosen)
    return chosen.classifier.decision_function(
        signal_matrix(chosen.signals, table["logits"], cond, table.get("lcr"))
    )


def _take(table: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: (v[:, rows] if k == "mutant_labels" else v[rows]) for k, v in table.items() if np.ndim(v) >= 1}


def evaluate_attack(
    gate: Gate, clean: dict[str, np.ndarray], adv: dict[str, np.ndarray], *, n_boot: int, seed: int = 0
) -> dict[str, Any]:
    """Every figure of one attack; ``clean`` holds the same test rows as ``adv`` (same order)."""
    label = adv["label"]
    clean_correct = clean["prediction"] == label
    fooled = clean_correct & (adv["prediction"] != label)
    out: dict[str, Any] = {
        "images": len(label),
        "clean_correct": int(clean_correct.sum()),
        "successful": int(fooled.sum()),
        "success_rate": float(fooled.sum() / max(int(clean_correct.sum()), 1)),
        "adv_accuracy": float((adv["prediction"] == label).mean()),
        "mean_lcr_clean_correct": float(clean["lcr"][clean_correct].mean()) if "lcr" in clean else None,
        "mean_lcr_successful": float(adv["lcr"][fooled].mean()) if "lcr" in adv and fooled.any() else None,
        "sets": {},
    }
    # Sets with open-world signals need penultimate features the stored evidence lacks: not scored here.
    scores = {
        name: (set_scores(gate, name, clean), set_scores(gate, name, adv))
        for name, chosen in gate.signal_sets.items()
        if not any(sig in OPEN_WORLD_SIGNALS for sig in chosen.signals)
    }
    wang_target = np.concatenate([np.zeros(int(clean_correct.sum())), np.ones(int(fooled.sum()))]).astype(int)
    mix_wrong = np.concatenate([clean["prediction"] != label, adv["prediction"] != label]).astype(int)
    base_c, base_a = scores[BASELINE]
    for name, (sc, sa) in scores.items():
        row: dict[str, Any] = {"signals": list(gate.signal_set(name).signals)}
        if fooled.any():
            wang = np.concatenate([sc[clean_correct], sa[fooled]])
            wang_base = np.concatenate([base_c[clean_correct], base_a[fooled]])
            row["adv_vs_clean"] = paired_bootstrap_auroc(
                wang, wang_base, wang_target, n_boot=n_boot, seed=seed
            )
        mix = np.concatenate([sc, sa])
        if 0 < mix_wrong.sum() < len(mix_wrong):
            row["wrong_vs_correct"] = paired_bootstrap_auroc(
                mix, np.concatenate([base_c, base_a]), mix_wrong, n_boot=n_boot, seed=seed
            )
        points = {}
        for pname, point in gate.signal_set(name).operating_points.items():
            rej_c, rej_a = point.reject(sc), point.reject(sa)
            accepted = ~np.concatenate([rej_c, rej_a])
            points[pname] = {
                "reject_successful_adv": float(rej_a[fooled].mean()) if fooled.any() else None,
                "reject_clean_correct": float(rej_c[clean_correct].mean()) if clean_correct.any() else None,
                "accuracy_accepted_mix": float(1 - mix_wrong[accepted].mean()) if accepted.any() else None,
                "accepted_mix": float(accepted.mean()),
            }
        row["operating_points"] = points
        out["sets"][name] = row
    return out


def wang_check(clean: dict[str, np.ndarray], adv: dict[str, np.ndarray]) -> float | None:
    """Raw LCR's AUROC in Wang et al.'s setting (no classifier), a cross-check of the set 'lcr'."""
    if "lcr" not in adv:
        return None
    cc = clean["prediction"] == adv["label"]
    fooled = cc & (adv["prediction"] != adv["label"])
    if not fooled.any():
        return None
    return auroc(
        np.concatenate([clean["lcr"][cc], adv["lcr"][fooled]]),
        np.r_[np.zeros(cc.sum()), np.ones(fooled.sum())],
    )


def _fmt_ci(r: dict[str, Any] | None, key: str = "auroc_a") -> str:
    if r is None:
        return "-"
    return f"{r[key]:.3f}"


def _fmt_diff(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    low, high = r["ci_diff"]
    mark = " **+**" if low > 0 else (" **-**" if high < 0 else "")
    return f"{r['diff']:+.3f} [{low:+.3f}, {high:+.3f}]{mark}"


def write_markdown(result: dict[str, Any], path: Path) -> None:
    lines = [
        f"# Adversarial inputs: {result['bundle_id']}",
        "",
        "Evidence of each rounded (uint8) adversarial image from the bundle's extractor; every signal set",
        "scores with the classifier and operating points fitted on clean data (it never saw an attack).",
        (
            "AUROC with paired bootstrap 95% CI of the difference "
            f"to {BASELINE} ({result['n_boot']} replicates);"
        ),
        "**+** / **-**: CI above / below 0.",
        "",
        "## Attacks",
        "",
        (
            "| attack | images | clean correct | success rate | adversarial accuracy | "
            "mean LCR clean correct | mean LCR successful | raw-LCR AUROC adv vs clean |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tag, r in result["attacks"].items():
        lcr_c = "-" if r["mean_lcr_clean_correct"] is None else f"{r['mean_lcr_clean_correct']:.3f}"
        lcr_a = "-" if r["mean_lcr_successful"] is None else f"{r['mean_lcr_successful']:.3f}"
        raw = "-" if r["raw_lcr_auroc"] is None else f"{r['raw_lcr_auroc']:.3f}"
        lines.append(
            f"| {tag} | {r['images']} | {r['clean_correct']} | {r['success_rate']:.3f} | "
            f"{r['adv_accuracy']:.3f} | {lcr_c} | {lcr_a} | {raw} |"
        )
    for setting, title in (
        ("adv_vs_clean", "successful adversarial vs. clean correct (Wang et al.'s setting)"),
        ("wrong_vs_correct", "wrong for any reason vs. correct (clean + adversarial rows)"),
    ):
        sets = list(next(iter(result["attacks"].values()))["sets"])
        lines += [
            "",
            f"## AUROC, {title}",
            "",
            "| attack | " + " | ".join(sets) + " |",
            "| --- |" + " --- |" * len(sets),
        ]
        for tag, r in result["attacks"].items():
            lines.append(f"| {tag} | " + " | ".join(_fmt_ci(r["sets"][s].get(setting)) for s in sets) + " |")
        lines += [
            "",
            f"Difference to {BASELINE} [95% CI]:",
            "",
            "| attack | " + " | ".join(s for s in sets if s != BASELINE) + " |",
            "| --- |" + " --- |" * (len(sets) - 1),
        ]
        for tag, r in result["attacks"].items():
            lines.append(
                f"| {tag} | "
                + " | ".join(_fmt_diff(r["sets"][s].get(setting)) for s in sets if s != BASELINE)
                + " |"
            )
    lines += [
        "",
        "## At the operating points",
        "",
        "Rejected share of successful adversarial inputs / of clean correct inputs; accuracy among the",
        "accepted inputs of the clean + adversarial mix.",
        "",
    ]
    # The union over sets: a set may lack a point its scores cannot reach (e.g. a risk target on val).
    points = list(
        dict.fromkeys(
            point
            for r in result["attacks"].values()
            for row in r["sets"].values()
            for point in row["operating_points"]
        )
    )
    for point in points:
        lines += [
            f"### {point}",
            "",
            "| attack | set | reject adv | reject clean correct | acc. accepted (mix) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for tag, r in result["attacks"].items():
            for s, row in r["sets"].items():
                p = row["operating_points"].get(point)
                if p is None:
                    lines.append(f"| {tag} | {s} | not stored for this set | - | - |")
                    continue
                f = lambda v: "-" if v is None else f"{v:.3f}"
                lines.append(
                    f"| {tag} | {s} | {f(p['reject_successful_adv'])} | {f(p['reject_clean_correct'])} "
                    f"| {f(p['accuracy_accepted_mix'])} |"
                )
        lines.append("")
    lines += [
        "## Anchors (Wang et al., ICSE 2019, AUROC adversarial vs. clean, best operator)",
        "",
        "| data (model) | FGSM | C&W | DeepFool | black-box | JSMA |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for data, a in WANG_ANCHORS.items():
        lines.append(
            f"| {data} | {a['fgsm']} | {a['cw-l2']} | {a['deepfool']} | {a['square']} | {a['jsma']} |"
        )
    lines.append("")
    path.write_text("\n".join(lines))


def write_plot(result: dict[str, Any], path: Path) -> None:
    tags = list(result["attacks"])
    sets = list(next(iter(result["attacks"].values()))["sets"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    width = 0.8 / len(sets)
    for ax, setting in zip(axes, ("adv_vs_clean", "wrong_vs_correct"), strict=True):
        for i, s in enumerate(sets):
            vals = [(result["attacks"][t]["sets"][s].get(setting) or {}).get("auroc_a", np.nan) for t in tags]
            ax.bar(np.arange(len(tags)) + i * width, vals, width, label=s)
        ax.set_xticks(np.arange(len(tags)) + 0.4 - width / 2)
        ax.set_xticklabels(tags, rotation=60, ha="right", fontsize=6)
        ax.set_ylim(0.4, 1.0)
        ax.axhline(0.5, color="k", lw=0.5)
        ax.set_title(setting.replace("_", " "))
    axes[0].set_ylabel("AUROC")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def robustness_report(
    bundle: Bundle, *, tags: list[str] | None = None, n_boot: int = 1000, progress: bool = True
) -> dict[str, Any]:
    gate = load_gate(bundle)
    stopping = load_early_stopping(bundle)
    test = (
        apply_early_stopping(load_features(bundle)["test"], stopping)
        if stopping
        else load_features(bundle)["test"]
    )
    stored = sorted(bundle.get(ADVERSARIAL_DIR) or {})
    tags = tags or stored
    result: dict[str, Any] = {
        "bundle_id": bundle.manifest.get("bundle_id", bundle.path.name),
        "n_boot": n_boot,
        "attacks": {},
    }
    for tag in tags:
        n = (bundle.get(ADVERSARIAL_DIR) or {}).get(tag, {}).get("images")
        adv = evidence_of(bundle, gate, tag, n, progress)
        if stopping is not None and "mutant_labels" in adv:
            adv = apply_early_stopping(adv, stopping)
        clean = _take(test, adv["index"])
        r = evaluate_attack(gate, clean, adv, n_boot=n_boot)
        r["raw_lcr_auroc"] = wang_check(clean, adv)
        r["attack"] = (bundle.get(ADVERSARIAL_DIR) or {}).get(tag, {}).get("settings")
        result["attacks"][tag] = r
    out = bundle.path / REPORT_DIR
    out.mkdir(exist_ok=True)
    (bundle.path / ROBUSTNESS_FILE).write_text(json.dumps(result, indent=2))
    write_markdown(result, bundle.path / ROBUSTNESS_MARKDOWN_FILE)
    write_plot(result, out / "robustness.png")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument(
        "--tags", nargs="+", default=None, help="attack folders to include (default: all stored)"
    )
    parser.add_argument("--n-boot", type=int, default=1000)


def run(args: argparse.Namespace, progress: bool) -> None:
    robustness_report(load_bundle(args.bundle), tags=args.tags, n_boot=args.n_boot, progress=progress)
    print(f"robustness report written to {args.bundle / ROBUSTNESS_MARKDOWN_FILE}")

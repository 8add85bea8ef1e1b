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
    load_bundle,
)
from models.errors import ConfigError
from models.gate import Gate, load_gate
from models.metrics import accept_lowest, auroc, paired_bootstrap_auroc, paired_selective_accuracy
from models.scores import doctor, msp_score
from offline.adversarial_evidence import (
    AttackRows,
    adversarial_evidence,
    scorable_sets,
    set_scores,
    split_evidence,
)
from offline.adversarial_exposure import exposure_lines, exposure_study
from offline.attack import attacked_split, run_attack
from offline.attack_plans import plan_for

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
BASELINES = {"msp": msp_score, "doctor": doctor}
"""The free scores every set is set against, computed from the same logits: softmax confidence
(MSP) and DOCTOR (Granese et al. 2021)."""
SETTINGS = {
    "adv_vs_clean": "successful adversarial vs. clean correct (Wang et al.'s setting)",
    "wrong_vs_correct": "wrong for any reason vs. correct (clean + adversarial rows)",
}


def compare_auroc(
    scores: np.ndarray, baselines: dict[str, np.ndarray], positive: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any]:
    """AUROC of ``scores`` and its paired bootstrap CI against every baseline on the same rows."""
    out: dict[str, Any] = {"auroc": auroc(scores, positive)}
    for name, base in baselines.items():
        out[f"vs_{name}"] = paired_bootstrap_auroc(scores, base, positive, n_boot=n_boot, seed=seed)
    return out


def at_equal_coverage(
    accepted: np.ndarray, baselines: dict[str, np.ndarray], wrong: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any]:
    """Each baseline accepting as many rows as ``accepted`` (its most confident ones), and the paired
    CI of the accuracy difference among accepted rows (the set minus the baseline)."""
    n = int(accepted.sum())
    return {
        name: paired_selective_accuracy(accepted, accept_lowest(base, n), wrong, n_boot=n_boot, seed=seed)
        for name, base in baselines.items()
    }


def evaluate_attack(
    gate: Gate,
    clean: dict[str, np.ndarray],
    adv: dict[str, np.ndarray],
    *,
    n_boot: int,
    seed: int = 0,
    sets: list[str] | None = None,
) -> dict[str, Any]:
    """Every figure of one attack; ``clean`` holds the same test rows as ``adv`` (same order)."""
    label = adv["label"]
    rows = AttackRows.of(clean, adv)
    clean_correct, fooled, mix_wrong = rows.clean_correct, rows.fooled, rows.mix_wrong
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
    names = sets if sets is not None else scorable_sets(gate)
    scores = {name: (set_scores(gate, name, clean), set_scores(gate, name, adv)) for name in names}
    free = {k: (np.asarray(f(clean["logits"])), np.asarray(f(adv["logits"]))) for k, f in BASELINES.items()}
    wang_target = rows.wang_target

    def wang(pair: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return rows.wang(*pair)

    def mix(pair: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return rows.mix(*pair)

    has_both = 0 < mix_wrong.sum() < len(mix_wrong)
    out["baselines"] = {
        "adv_vs_clean": {k: auroc(wang(v), wang_target) for k, v in free.items()} if fooled.any() else {},
        "wrong_vs_correct": {k: auroc(mix(v), mix_wrong) for k, v in free.items()} if has_both else {},
    }
    free_mix = {k: mix(v) for k, v in free.items()}
    for name, pair in scores.items():
        row: dict[str, Any] = {"signals": list(gate.signal_set(name).signals)}
        if fooled.any():
            row["adv_vs_clean"] = compare_auroc(
                wang(pair), {k: wang(v) for k, v in free.items()}, wang_target, n_boot, seed
            )
        if has_both:
            row["wrong_vs_correct"] = compare_auroc(mix(pair), free_mix, mix_wrong, n_boot, seed)
        points = {}
        for pname, point in gate.signal_set(name).operating_points.items():
            rej_c, rej_a = point.reject(pair[0]), point.reject(pair[1])
            accepted = ~np.concatenate([rej_c, rej_a])
            points[pname] = {
                "reject_successful_adv": float(rej_a[fooled].mean()) if fooled.any() else None,
                "reject_clean_correct": float(rej_c[clean_correct].mean()) if clean_correct.any() else None,
                "accuracy_accepted_mix": float(1 - mix_wrong[accepted].mean()) if accepted.any() else None,
                "accepted_mix": float(accepted.mean()),
                "same_coverage": at_equal_coverage(accepted, free_mix, mix_wrong, n_boot, seed)
                if accepted.any()
                else {},
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


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def fmt_diff(diff: float | None, ci: Any) -> str:
    """``+0.012 [+0.004, +0.020]``, with **+** / **-** where the CI excludes 0."""
    if diff is None or ci is None or not np.isfinite(diff):
        return "-"
    low, high = ci
    mark = " **+**" if low > 0 else (" **-**" if high < 0 else "")
    return f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]{mark}"


def _vs(row: dict[str, Any] | None, baseline: str) -> str:
    if row is None:
        return "-"
    cmp = row[f"vs_{baseline}"]
    return fmt_diff(cmp["diff"], cmp["ci_diff"])


def attack_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        (
            "| attack | images | clean correct | success rate | adversarial accuracy | "
            "mean LCR clean correct | mean LCR successful | raw-LCR AUROC adv vs clean |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tag, r in result["attacks"].items():
        lines.append(
            f"| {tag} | {r['images']} | {r['clean_correct']} | {r['success_rate']:.3f} | "
            f"{r['adv_accuracy']:.3f} | {fmt(r['mean_lcr_clean_correct'])} | "
            f"{fmt(r['mean_lcr_successful'])} | {fmt(r['raw_lcr_auroc'])} |"
        )
    return lines


def auroc_lines(result: dict[str, Any], setting: str) -> list[str]:
    sets = list(next(iter(result["attacks"].values()))["sets"])
    lines = [
        f"## AUROC, {SETTINGS[setting]}",
        "",
        "| attack | MSP (raw) | DOCTOR (raw) | " + " | ".join(sets) + " |",
        "| --- | --- | --- |" + " --- |" * len(sets),
    ]
    for tag, r in result["attacks"].items():
        base = r["baselines"].get(setting, {})
        cells = [fmt((r["sets"][s].get(setting) or {}).get("auroc")) for s in sets]
        lines.append(
            f"| {tag} | {fmt(base.get('msp'))} | {fmt(base.get('doctor'))} | " + " | ".join(cells) + " |"
        )
    for baseline in BASELINES:
        lines += [
            "",
            f"Difference to {baseline.upper()} [paired 95% CI]:",
            "",
            "| attack | " + " | ".join(sets) + " |",
            "| --- |" + " --- |" * len(sets),
        ]
        for tag, r in result["attacks"].items():
            lines.append(
                f"| {tag} | " + " | ".join(_vs(r["sets"][s].get(setting), baseline) for s in sets) + " |"
            )
    return lines


def point_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        "## At the operating points, and MSP / DOCTOR at the same coverage",
        "",
        "Rejected share of successful adversarial inputs / of clean correct inputs; coverage and accuracy",
        "among accepted inputs of the clean + adversarial mix; MSP and DOCTOR accepting exactly as many",
        "inputs of the mix (their most confident), with the paired 95% CI of the accuracy difference",
        "(set minus baseline; **+**: the set keeps more right answers at equal coverage).",
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
            (
                "| attack | set | reject adv | reject clean correct | coverage (mix) | acc. accepted (mix) "
                "| MSP, same coverage | vs MSP | DOCTOR, same coverage | vs DOCTOR |"
            ),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for tag, r in result["attacks"].items():
            for s, row in r["sets"].items():
                p = row["operating_points"].get(point)
                if p is None:
                    lines.append(f"| {tag} | {s} | not stored for this set | - | - | - | - | - | - | - |")
                    continue
                same = p.get("same_coverage", {})
                cells = []
                for baseline in BASELINES:
                    b = same.get(baseline)
                    cells += [fmt(b["accuracy_b"]), fmt_diff(b["diff"], b["ci_diff"])] if b else ["-", "-"]
                lines.append(
                    f"| {tag} | {s} | {fmt(p['reject_successful_adv'])} | {fmt(p['reject_clean_correct'])} "
                    f"| {fmt(p['accepted_mix'])} | {fmt(p['accuracy_accepted_mix'])} | "
                    + " | ".join(cells)
                    + " |"
                )
        lines.append("")
    return lines


def write_markdown(result: dict[str, Any], path: Path) -> None:
    lines = [
        f"# Adversarial inputs: {result['bundle_id']}",
        "",
        "Evidence of each rounded (uint8) adversarial image from the bundle's extractor; every signal set",
        "scores with the classifier and operating points fitted on clean data (it never saw an attack).",
        "AUROC with the paired bootstrap 95% CI of the difference to MSP and to DOCTOR, both computed from",
        f"the same logits ({result['n_boot']} replicates); **+** / **-**: CI above / below 0.",
        "",
        "## Attacks",
        "",
        *attack_lines(result),
    ]
    for setting in SETTINGS:
        lines += ["", *auroc_lines(result, setting)]
    lines += ["", *point_lines(result)]
    if result.get("adv_exposure"):
        lines += ["", *exposure_lines(result["adv_exposure"])]
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
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True)
    width = 0.8 / (len(sets) + len(BASELINES))
    for ax, setting in zip(axes, SETTINGS, strict=True):
        bars = {
            f"{b.upper()} (raw)": [
                result["attacks"][t]["baselines"].get(setting, {}).get(b, np.nan) for t in tags
            ]
            for b in BASELINES
        }
        bars.update(
            {
                s: [(result["attacks"][t]["sets"][s].get(setting) or {}).get("auroc", np.nan) for t in tags]
                for s in sets
            }
        )
        for i, (name, vals) in enumerate(bars.items()):
            ax.bar(np.arange(len(tags)) + i * width, vals, width, label=name)
        ax.set_xticks(np.arange(len(tags)) + 0.4 - width / 2)
        ax.set_xticklabels(tags, rotation=60, ha="right", fontsize=6)
        # from 0: against PGD the adversarial inputs are often *more* confident than clean ones
        # (AUROC well below chance), which a cut axis would hide
        ax.set_ylim(0.0, 1.0)
        ax.axhline(0.5, color="k", lw=0.5)
        ax.set_title(setting.replace("_", " "))
    axes[0].set_ylabel("AUROC")
    axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not on bars
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measured_tags(bundle: Bundle) -> list[str]:
    """Stored attacks on the test split (those on fit / val are rows a detector may learn from)."""
    return sorted(t for t in (bundle.get(ADVERSARIAL_DIR) or {}) if attacked_split(bundle, t) == "test")


def robustness_report(
    bundle: Bundle,
    *,
    tags: list[str] | None = None,
    n_boot: int = 1000,
    adv_exposure: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every stored set on each attack (``tags``, default every test-split attack); with
    ``adv_exposure`` (an attack tag also stored on fit and val) also fit and measure the detectors
    that learn from those adversarial rows (:mod:`offline.adversarial_exposure`)."""
    gate = load_gate(bundle)
    tags = tags or measured_tags(bundle)
    for tag in tags:
        if attacked_split(bundle, tag) != "test":
            raise ConfigError(
                f"{tag} attacks the {attacked_split(bundle, tag)} split: only test attacks are measured"
            )
    result: dict[str, Any] = {
        "bundle_id": bundle.manifest.get("bundle_id", bundle.path.name),
        "n_boot": n_boot,
        "attacks": {},
    }
    tables = {}
    for tag in tags:
        n = (bundle.get(ADVERSARIAL_DIR) or {}).get(tag, {}).get("images")
        adv = adversarial_evidence(bundle, gate, tag, n, progress)
        clean = split_evidence(bundle, gate, "test", adv["index"])
        tables[tag] = (clean, adv)
        log.info("robustness: scoring %s", tag)
        r = evaluate_attack(gate, clean, adv, n_boot=n_boot)
        r["raw_lcr_auroc"] = wang_check(clean, adv)
        r["attack"] = (bundle.get(ADVERSARIAL_DIR) or {}).get(tag, {}).get("settings")
        result["attacks"][tag] = r
    if adv_exposure is not None:
        result["adv_exposure"] = exposure_study(
            bundle, gate, adv_exposure, tables, n_boot=n_boot, progress=progress
        )
    out = bundle.path / REPORT_DIR
    out.mkdir(exist_ok=True)
    (bundle.path / ROBUSTNESS_FILE).write_text(json.dumps(result, indent=2))
    write_markdown(result, bundle.path / ROBUSTNESS_MARKDOWN_FILE)
    write_plot(result, out / "robustness.png")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument(
        "--tags", nargs="+", default=None, help="attack folders to include (default: all stored on test)"
    )
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument(
        "--plan",
        choices=["standard"],
        default=None,
        help="first run the data set's standard attacks (offline/attack_plans.py; resumable), also on "
        "fit and val for --adv-exposure, then report on them all",
    )
    parser.add_argument(
        "--images", type=int, default=500, help="with --plan: test images per attack (default 500)"
    )
    parser.add_argument(
        "--adv-exposure",
        default=None,
        metavar="TAG",
        help="also fit detectors with adversarial rows: the attack TAG made on fit and val "
        "(predgate attack --split fit / --split val), measured on every other attack",
    )


def run_plan(bundle: Bundle, images: int, progress: bool) -> tuple[list[str], str]:
    """Run (or resume) the data set's standard attacks; returns the measured tags and the exposure tag."""
    plan = plan_for(bundle.manifest["dataset"]["name"])
    tags = []
    for planned in plan.attacks:
        n = planned.images or images
        summary = run_attack(bundle, planned.spec, images=n, progress=progress)
        log.info("%s: success rate %.3f on %d images", planned.spec.tag, summary["success_rate"], n)
        tags.append(planned.spec.tag)
    for split in ("fit", "val"):
        run_attack(bundle, plan.exposure, split=split, images=plan.exposure_images, progress=progress)
    if plan.exposure.tag not in tags:
        run_attack(bundle, plan.exposure, images=images, progress=progress)
        tags.append(plan.exposure.tag)
    return tags, plan.exposure.tag


def run(args: argparse.Namespace, progress: bool) -> None:
    bundle = load_bundle(args.bundle)
    tags, exposure = args.tags, args.adv_exposure
    if args.plan is not None:
        planned, planned_exposure = run_plan(bundle, args.images, progress)
        tags, exposure = tags or planned, exposure or planned_exposure
    robustness_report(bundle, tags=tags, n_boot=args.n_boot, adv_exposure=exposure, progress=progress)
    print(f"robustness report written to {args.bundle / ROBUSTNESS_MARKDOWN_FILE}")

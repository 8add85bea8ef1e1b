"""The report of a refit from reviews: did the reviewed rejections make the served set better?

Written into the refitted bundle (``report/reviews.{json,md}`` and ``report/reviews_roc.png``): the
verdict first (stated plainly when there is no gain, or when softmax confidence does as well), then
per seed the held-out reviewed AUROC of the base arm, the refit, MSP and DOCTOR with paired bootstrap CIs, the
same on the clean test split (a refit must not buy the reviewed inputs with the clean ones), and what
each arm's threshold accepts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.bundle import REVIEWS_REPORT_JSON, REVIEWS_REPORT_MARKDOWN, REVIEWS_REPORT_PLOT, Bundle
from models.scores import msp_score
from offline.markdown import fmt, signed_ci
from offline.plots import plot_roc

PARTS = {"held_out": "held-out reviewed rejections", "test": "clean test split"}


def _point_row(seed: int, part: str, arm: str, at: dict[str, Any] | None) -> str:
    if at is None:
        return f"| {seed} | {PARTS[part]} | {arm} | infeasible | | | |"
    return (
        f"| {seed} | {PARTS[part]} | {arm} | {fmt(at['coverage'])} | {fmt(at['accepted_accuracy'])} | "
        f"{at['accepted_right']} | {at['accepted_wrong']} |"
    )


def review_markdown(summary: dict[str, Any]) -> str:
    counts = summary["counts"]
    lines = [
        "# Refit from reviewed rejections",
        "",
        f"**Verdict: {summary['verdict']['text']}.**",
        "",
        (
            f"Bundle `{summary['bundle']}`, derived from `{summary['base_bundle']}`. The served set "
            f"`{summary['served_before']}` ({summary['variant']} variant) was fitted again with reviewed "
            "rejections added to its fit and val splits (thresholds still from the base's val rows), and is "
            f"served as `{summary['served_after']}`; the base set stays in the bundle."
        ),
        "",
        (
            f"Reviews (`{summary['reviews_file']}`): {counts['reviewed']} fit this bundle, of which the CNN "
            f"had {counts['wrong']} wrong ({counts['none_of_these']} of no class); skipped: "
            f"{counts['skipped'] or 'none'}. Split (stratified by right/wrong, seed "
            f"{summary['split_seed']}): {counts['refit']} to refit, {counts['held_out']} held out. "
            "Predictions recomputed by the bundle differing from those recorded at review time: "
            f"{counts['prediction_changed']}."
        ),
        "",
        (
            "The base arm is the served set refitted without reviews; its seed-0 test scores differ from the "
            f"base bundle's stored ones by at most {summary['base_arm_max_abs_diff_vs_stored']:.2e}."
        ),
        "",
        (
            f"## AUROC of wrong-answer detection ({summary['seeds']} seeds, paired bootstrap, "
            f"{summary['n_boot']} replicates)"
        ),
        "",
        (
            "| seed | images | base | refit | MSP | DOCTOR | refit - base [95% CI] | refit - MSP [95% CI] "
            "| refit - DOCTOR [95% CI] |"
        ),
        "|---:|---|---:|---:|---:|---:|---|---|---|",
    ]
    for row in summary["per_seed"]:
        for part, images in PARTS.items():
            got = row[part]
            lines.append(
                f"| {row['seed']} | {images} | {fmt(got['auroc']['base'])} | {fmt(got['auroc']['reviewed'])} "
                f"| {fmt(got['auroc']['msp'])} | {fmt(got['auroc']['doctor'])} | "
                + " | ".join(
                    f"{got[f'diff_vs_{n}']:+.4f} {signed_ci(got[f'ci_vs_{n}'])}"
                    for n in ("base", "msp", "doctor")
                )
                + " |"
            )
    lines += [
        "",
        f"## At the operating point `{summary['operating_point']}` (each arm's threshold chosen on val)",
        "",
        (
            "On the held-out reviews the base gate rejected every image when it was served; an accepted "
            "right answer is one a person need not have seen, an accepted wrong one is an error let through."
        ),
        "",
        "| seed | images | arm | coverage | selective accuracy | accepted right | accepted wrong |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in summary["per_seed"]:
        for part in PARTS:
            for arm in ("base", "reviewed"):
                lines.append(_point_row(row["seed"], part, arm, row[part]["at_point"][arm]))
    lines += [
        "",
        "![ROC on the held-out reviews](reviews_roc.png)",
        "",
        (
            f"{summary['seconds']:.0f} s. Reproduce: `predgate build --from BASE --out NEW --redo detectors "
            f"--reviews {summary['reviews_file']} --review-held-out {summary['held_out_fraction']}`."
        ),
        "",
    ]
    return "\n".join(lines)


def write_review_report(
    bundle: Bundle,
    summary: dict[str, Any],
    per_seed: list[dict[str, Any]],
    held: dict[str, np.ndarray],
    wrong: np.ndarray,
) -> None:
    """JSON, markdown and the seed-0 ROC of both arms and MSP on the held-out reviews."""
    bundle.write_json(REVIEWS_REPORT_JSON, summary)
    (bundle.path / REVIEWS_REPORT_MARKDOWN).write_text(review_markdown(summary))
    seed0 = per_seed[0]["scores"]
    plot_roc(
        {
            f"base ({summary['served_before']})": seed0["base"]["held_out"],
            f"refit ({summary['served_after']})": seed0["reviewed"]["held_out"],
            "MSP": np.asarray(msp_score(held["logits"])),
        },
        wrong,
        bundle.path / REVIEWS_REPORT_PLOT,
        "held-out reviewed rejections (seed 0)",
    )
    bundle.record_file(REVIEWS_REPORT_MARKDOWN)
    bundle.record_file(REVIEWS_REPORT_PLOT)

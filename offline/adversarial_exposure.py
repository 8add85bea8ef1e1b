"""Detectors that also learn from adversarial examples, measured on attacks they never saw.

``predgate robustness --adv-exposure TAG`` fits every build signal set twice for each detector seed,
with :func:`offline.open_world.fit_variant` (the open world's exposure machinery):

- ``clean``: on the bundle's fit split, thresholds on its val split (what the build does);
- ``adv``: the same rows plus the adversarial versions of fit and val images made by attack ``TAG``
  (``predgate attack --split fit`` and ``--split val``), each with its true label, so a successful
  one is a "wrong" row; thresholds on val with its adversarial rows.

Both are then measured on every attack stored on the test split. An attack is ``seen`` (the exposure
attack itself, on other images), ``same attack, other budget``, or ``unseen``: only unseen attacks
say whether the detector learned something about adversarial inputs rather than about one attack.
The clean test split gives what the adversarial rows cost where no attacker is.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from models.bundle import ADVERSARIAL_DIR, DEFAULT_COND_INPUTS, Bundle
from models.errors import ConfigError
from models.gate import Gate
from models.metrics import (
    accept_lowest,
    auroc,
    paired_bootstrap_auroc,
    paired_selective_accuracy,
    wrong_labels,
)
from models.scores import msp_score
from models.signals import CANDIDATE_SETS, OPEN_WORLD_SETS
from offline.adversarial_evidence import AttackRows, adversarial_evidence, split_evidence
from offline.attack import stored_tag
from offline.open_world import VariantFit, concat_tables, fit_variants

log = logging.getLogger("predgate.robustness")

EXPOSURE_SETS = (*CANDIDATE_SETS, "feat+softmax", "cond+feat+softmax")
"""The build's sets, and where the gate has the open-world scorers, the default's feature sets."""
POINT = "equal-recall"
SETTINGS = ("wrong_vs_correct", "adv_vs_clean")


def relation(exposure: dict[str, Any], measured: dict[str, Any] | None, same_tag: bool) -> str:
    """How a measured attack relates to the exposure attack (by the stored attack specs)."""
    if same_tag:
        return "seen"
    if measured is not None and measured["spec"]["name"] == exposure["spec"]["name"]:
        return "same attack, other budget"
    return "unseen"


def _sets(gate: Gate) -> dict[str, tuple[str, ...]]:
    every = {**CANDIDATE_SETS, **OPEN_WORLD_SETS}
    out = {name: every[name] for name in EXPOSURE_SETS}
    if gate.extractor.ensemble is None:
        out = {k: v for k, v in out.items() if "lcr" not in v}
    if gate.open_world is None:
        out = {k: v for k, v in out.items() if k in CANDIDATE_SETS}
    return out


def _paired_over_seeds(
    a: list[np.ndarray], b: list[np.ndarray], positive: np.ndarray, n_boot: int
) -> dict[str, Any]:
    """a - b AUROC for each seed with its paired CI; the mean and how many seeds' CIs exclude 0."""
    per_seed = [
        paired_bootstrap_auroc(x, y, positive, n_boot=n_boot, seed=s) for s, (x, y) in enumerate(zip(a, b))
    ]
    return {
        "mean": float(np.mean([p["diff"] for p in per_seed])),
        "seed0": {"diff": per_seed[0]["diff"], "ci_diff": list(per_seed[0]["ci_diff"])},
        "seeds_above": int(sum(p["ci_diff"][0] > 0 for p in per_seed)),
        "seeds_below": int(sum(p["ci_diff"][1] < 0 for p in per_seed)),
        "seeds": len(per_seed),
    }


def _score_table(
    variants: dict[str, VariantFit],
    name: str,
    table: dict[str, np.ndarray],
    num_classes: int,
    cond_inputs: str,
) -> dict[str, list[np.ndarray]]:
    return {
        v: [vf.scores(fit.seed, name, table, num_classes, cond_inputs) for fit in vf.fits]
        for v, vf in variants.items()
    }


def _setting_rows(
    scores: dict[str, tuple[list[np.ndarray], list[np.ndarray]]],
    free: tuple[np.ndarray, np.ndarray],
    clean: dict[str, np.ndarray],
    adv: dict[str, np.ndarray],
    n_boot: int,
) -> dict[str, Any]:
    """Both settings of one set: mean AUROC per variant, adv - clean and adv - MSP over seeds."""
    rows = AttackRows.of(clean, adv)
    pick = {"wrong_vs_correct": (rows.mix, rows.mix_wrong), "adv_vs_clean": (rows.wang, rows.wang_target)}
    out: dict[str, Any] = {}
    for setting, (join, positive) in pick.items():
        if positive.min() == positive.max():
            continue
        joined = {v: [join(c, a) for c, a in zip(*pair)] for v, pair in scores.items()}
        msp = join(*free)
        out[setting] = {
            "auroc": {v: float(np.mean([auroc(s, positive) for s in seeds])) for v, seeds in joined.items()},
            "msp": auroc(msp, positive),
            "adv_minus_clean": _paired_over_seeds(joined["adv"], joined["clean"], positive, n_boot),
            "adv_minus_msp": _paired_over_seeds(joined["adv"], [msp] * len(joined["adv"]), positive, n_boot),
        }
    return out


def _at_point(
    variants: dict[str, VariantFit],
    name: str,
    scores: dict[str, tuple[list[np.ndarray], list[np.ndarray]]],
    free: tuple[np.ndarray, np.ndarray],
    clean: dict[str, np.ndarray],
    adv: dict[str, np.ndarray],
    n_boot: int,
) -> dict[str, Any]:
    """Each variant at its equal-recall point (seed 0): what it rejects, and MSP at its coverage."""
    rows = AttackRows.of(clean, adv)
    mix_wrong, clean_correct, fooled = rows.mix_wrong, rows.clean_correct, rows.fooled
    msp = np.concatenate(free)
    out = {}
    for v, vf in variants.items():
        point = vf.points.get((vf.fits[0].seed, name), {}).get(POINT)
        if point is None:
            continue
        c, a = scores[v][0][0], scores[v][1][0]
        accepted = ~np.concatenate([point.reject(c), point.reject(a)])
        same = (
            paired_selective_accuracy(
                accepted, accept_lowest(msp, int(accepted.sum())), mix_wrong, n_boot=n_boot
            )
            if accepted.any()
            else None
        )
        out[v] = {
            "reject_successful_adv": float(point.reject(a)[fooled].mean()) if fooled.any() else None,
            "reject_clean_correct": float(point.reject(c)[clean_correct].mean())
            if clean_correct.any()
            else None,
            "coverage_mix": float(accepted.mean()),
            "msp_same_coverage": same,
        }
    return out


def exposure_study(
    bundle: Bundle,
    gate: Gate,
    tag: str,
    tables: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
    *,
    n_boot: int = 1000,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit the ``clean`` and ``adv`` variants and measure both on every attack in ``tables`` (tag ->
    clean test rows, adversarial rows) and on the clean test split."""
    stored = bundle.get(ADVERSARIAL_DIR) or {}
    fit_tag, val_tag = stored_tag(tag, "fit"), stored_tag(tag, "val")
    missing = [t for t in (fit_tag, val_tag) if t not in stored]
    if missing:
        raise ConfigError(
            f"--adv-exposure {tag}: the bundle lacks {missing}; make them with the same attack and "
            "`predgate attack ... --split fit` and `--split val`"
        )
    rows = {
        split: adversarial_evidence(bundle, gate, t, stored[t].get("images"), progress=progress)
        for split, t in (("fit", fit_tag), ("val", val_tag))
    }
    base = {split: split_evidence(bundle, gate, split) for split in ("fit", "val", "test")}
    exposed = {
        **base,
        "fit": concat_tables(base["fit"], rows["fit"]),
        "val": concat_tables(base["val"], rows["val"]),
    }
    section = bundle.detectors
    cond_inputs = section.conductance.inputs if section else DEFAULT_COND_INPUTS
    seeds = len(section.seeds) if section and section.seeds else 3
    signal_sets = _sets(gate)
    variants = fit_variants(
        {"clean": base, "adv": exposed},
        seeds=seeds,
        cond_inputs=cond_inputs,
        signal_sets=signal_sets,
        progress=progress,
    )
    fitted = [
        n for n in signal_sets if n in variants["adv"].fits[0].sets and n in variants["clean"].fits[0].sets
    ]
    num_classes = int(bundle.manifest["architecture"]["num_classes"])
    result: dict[str, Any] = {
        "tag": tag,
        "attack": stored[fit_tag]["settings"],
        "rows": {
            split: {
                "images": len(r["label"]),
                "wrong": int(wrong_labels(r).sum()),
            }
            for split, r in rows.items()
        },
        "seeds": seeds,
        "sets": fitted,
        "kinds": {v: {n: vf.fits[0].sets[n].kind for n in fitted} for v, vf in variants.items()},
        "attacks": {},
    }
    for measured, (clean, adv) in tables.items():
        free = (np.asarray(msp_score(clean["logits"])), np.asarray(msp_score(adv["logits"])))
        entry: dict[str, Any] = {
            "relation": relation(
                stored[fit_tag]["settings"], stored.get(measured, {}).get("settings"), measured == tag
            ),
            "sets": {},
        }
        for name in fitted:
            c = _score_table(variants, name, clean, num_classes, cond_inputs)
            a = _score_table(variants, name, adv, num_classes, cond_inputs)
            pairs = {v: (c[v], a[v]) for v in variants}
            entry["sets"][name] = {
                **_setting_rows(pairs, free, clean, adv, n_boot),
                "at_point": _at_point(variants, name, pairs, free, clean, adv, n_boot),
            }
        result["attacks"][measured] = entry
    test = base["test"]
    wrong = wrong_labels(test)
    msp = np.asarray(msp_score(test["logits"]))
    result["clean_test"] = {}
    for name in fitted:
        s = _score_table(variants, name, test, num_classes, cond_inputs)
        result["clean_test"][name] = {
            "auroc": {v: float(np.mean([auroc(x, wrong) for x in seeds])) for v, seeds in s.items()},
            "msp": auroc(msp, wrong),
            "adv_minus_clean": _paired_over_seeds(s["adv"], s["clean"], wrong, n_boot),
        }
    return result


def _diff(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    low, high = d["seed0"]["ci_diff"]
    mark = " **+**" if low > 0 else (" **-**" if high < 0 else "")
    return f"{d['mean']:+.3f} [{low:+.3f}, {high:+.3f}]{mark} ({d['seeds_above']}/{d['seeds']} above 0)"


def exposure_lines(study: dict[str, Any]) -> list[str]:
    """The report section: both variants on every attack and on clean test."""
    spec = study["attack"]["spec"]
    fit_rows, val_rows = study["rows"]["fit"], study["rows"]["val"]
    lines = [
        f"## Detectors fitted with adversarial rows ({study['tag']})",
        "",
        (
            f"`adv` detectors learn from the fit split plus its {fit_rows['images']} adversarial "
            f"versions ({fit_rows['wrong']} of them wrong) made by `{spec['name']}` (eps "
            f"{spec.get('eps')}); their thresholds are chosen on val plus its {val_rows['images']} "
            "adversarial versions. `clean`: the same fit without them. AUROC: mean over "
            f"{study['seeds']} detector seeds; differences: mean over seeds [seed 0's paired 95% CI] "
            "(seeds whose own CI lies above 0). Only `unseen` attacks show what the rows teach beyond "
            "the attack itself."
        ),
        "",
    ]
    for setting, title in (
        ("wrong_vs_correct", "wrong for any reason vs. correct"),
        ("adv_vs_clean", "successful adversarial vs. clean correct"),
    ):
        lines += [
            f"### {title}",
            "",
            "| attack | relation | set | MSP | clean fit | adv fit | adv - clean | adv - MSP |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for tag, entry in study["attacks"].items():
            for name, row in entry["sets"].items():
                r = row.get(setting)
                if r is None:
                    continue
                lines.append(
                    f"| {tag} | {entry['relation']} | {name} | {r['msp']:.3f} | {r['auroc']['clean']:.3f} | "
                    f"{r['auroc']['adv']:.3f} | {_diff(r['adv_minus_clean'])} | {_diff(r['adv_minus_msp'])} |"
                )
        lines.append("")
    lines += [
        f"### At the {POINT} point (seed 0), MSP at the same coverage of the clean + adversarial mix",
        "",
        (
            "| attack | set | variant | reject adv | reject clean correct | coverage | acc. accepted "
            "| MSP acc. | diff |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tag, entry in study["attacks"].items():
        for name, row in entry["sets"].items():
            for v, p in row["at_point"].items():
                same = p["msp_same_coverage"]
                f = lambda x: "-" if x is None else f"{x:.3f}"
                diff = "-"
                if same:
                    low, high = same["ci_diff"]
                    diff = f"{same['diff']:+.3f} [{low:+.3f}, {high:+.3f}]"
                acc_a, acc_b = (same["accuracy_a"], same["accuracy_b"]) if same else (None, None)
                lines.append(
                    f"| {tag} | {name} | {v} | {f(p['reject_successful_adv'])} | "
                    f"{f(p['reject_clean_correct'])} | {p['coverage_mix']:.3f} | {f(acc_a)} | {f(acc_b)} "
                    f"| {diff} |"
                )
    lines += [
        "",
        "### What the adversarial rows cost on clean test images",
        "",
        "| set | MSP | clean fit | adv fit | adv - clean |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in study["clean_test"].items():
        lines.append(
            f"| {name} | {row['msp']:.3f} | {row['auroc']['clean']:.3f} | {row['auroc']['adv']:.3f} | "
            f"{_diff(row['adv_minus_clean'])} |"
        )
    lines.append("")
    return lines

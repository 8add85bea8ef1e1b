"""``predgate adaptive``: what survives an attacker who knows the gate.

    predgate adaptive --bundle bundles/fashion-mnist-quick --images 300 --eps 0.1 --steps 40

On the first ``--images`` test images the CNN classifies correctly (Wang et al.'s setting), for
every signal set in ``--sets`` (default: MSP, the paper's cond+lcr and the bundle's default set):

- ``pgd``: torchattacks' l-inf PGD on the CNN alone (the gate ignored), the same budget;
- ``adaptive``: :func:`models.adaptive_attack.adaptive_pgd` on that set's differentiable verdict;
  for sets that read LCR twice, with ``--attack-mutants`` of the bundle's own mutants
  (``adaptive-known``) and as many the attacker drew itself with the bundle's operator and rate
  (``adaptive-redrawn``);
- ``blackbox``: torchattacks' Square (l-inf, ``--square-queries`` queries) on the CNN's
  probabilities, which every answer carries, tried ``--verdict-tries`` times with fresh seeds; the
  attacker sees only the answers and keeps, per image, the first try the gate accepts;
- ``any``: per image, whichever of those got through (an attacker tries them all).

Every adversarial image is rounded to uint8 (what a PNG carries) and judged by the real gate at the
set's default operating point, or with ``--point SPEC`` at that point for every set (chosen now on the
set's stored val scores where the bundle lacks it): ``--point correct-recall=0.8`` makes every set
reject the same share of correct val images, so the sets are compared at equal clean coverage.
The figure that matters is the **survival rate**: the share of
images whose answer is wrong *and* accepted, the failure a gate exists to prevent; with it the
attack's success rate (label flipped), the clean rejection rate of the same images (what the
operating point costs), and the paired bootstrap difference in survival to MSP under the same kind
of attack. Written to ``BUNDLE/report/adaptive-linf-eps<eps>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from models.adaptive_attack import (
    AdaptiveSpec,
    DifferentiableGate,
    adaptive_pgd,
    differentiable,
    redraw_mutants,
)
from models.attacks import AttackSpec, attack_batch, to_pixels, to_uint8
from models.bundle import REPORT_DIR, SCORES_FILE, Bundle, adaptive_report_files, load_bundle, scores_key
from models.data import load_splits
from models.errors import ConfigError
from models.gate import Gate, load_gate, load_mutants
from models.metrics import bootstrap_indices, wrong_labels
from models.operating_points import OperatingPoint, choose_threshold
from models.progress import maybe_tqdm

log = logging.getLogger("predgate.adaptive")
DEFAULT_SETS = ("msp", "cond+lcr")


def point_on_val(bundle: Bundle, name: str, spec: str) -> OperatingPoint:
    """Signal set ``name``'s operating point ``spec`` chosen on its stored val scores (seed 0), as the
    build chooses the points it stores (:func:`models.operating_points.choose_threshold`)."""
    scores = bundle.read_arrays(SCORES_FILE)
    key = scores_key(0, name, "val")
    if key not in scores:
        raise ConfigError(f"the bundle stores no val scores of signal set {name!r}, so no point {spec!r}")
    return choose_threshold(scores[key], wrong_labels(bundle.read_features("val")), spec)


def force_point(bundle: Bundle, gate: Gate, sets: list[str], spec: str) -> None:
    """Give every set in ``sets`` the point ``spec`` (the stored one, else chosen on val now)."""
    for name in sets:
        chosen = gate.signal_set(name)
        if spec not in chosen.operating_points:
            chosen.operating_points[spec] = point_on_val(bundle, name, spec)


def judge(
    gate: Gate,
    bundle: Bundle,
    pixels: torch.Tensor,
    labels: np.ndarray,
    set_name: str,
    chunk: int = 100,
    point: str | None = None,
) -> dict[str, np.ndarray]:
    """The real gate's verdict on the uint8 rounding of ``pixels``: ``wrong`` and ``rejected`` per image."""
    norm = bundle.normalisation
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1)
    wrong, rejected = [], []
    for s in range(0, len(pixels), chunk):
        rounded = to_pixels(to_uint8(pixels[s : s + chunk]))
        out = gate.run((rounded - mean) / std, signal_set=set_name, operating_point=point)
        wrong.append(out.prediction != labels[s : s + chunk])
        rejected.append(out.reject)
    return {"wrong": np.concatenate(wrong), "rejected": np.concatenate(rejected)}


def _rate_ci(x: np.ndarray, n_boot: int, seed: int) -> list[float]:
    means = np.concatenate([x[idx].mean(1) for idx in bootstrap_indices(len(x), n_boot, seed)])
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def _paired_diff(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    d = a.astype(np.float64) - b.astype(np.float64)
    return {"diff": float(d.mean()), "ci": _rate_ci(d, n_boot, seed)}


def _attack_chunks(
    fn: Any, pixels: torch.Tensor, labels: np.ndarray, chunk: int, progress: bool, desc: str
) -> torch.Tensor:
    parts = []
    for s in maybe_tqdm(range(0, len(pixels), chunk), progress, desc):
        parts.append(fn(pixels[s : s + chunk], torch.as_tensor(labels[s : s + chunk]), s // chunk))
    return torch.cat(parts)


def adaptive_report(
    bundle: Bundle,
    *,
    sets: list[str] | None = None,
    images: int = 300,
    eps: float = 0.1,
    steps: int = 40,
    lam: float = 1.0,
    attack_mutants: int = 10,
    square_queries: int = 500,
    verdict_tries: int = 3,
    chunk: int = 100,
    n_boot: int = 1000,
    seed: int = 0,
    point: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    gate = load_gate(bundle)
    sets = list(sets or [*DEFAULT_SETS, gate.default_set])
    sets = list(dict.fromkeys(sets))
    if "msp" not in sets:
        sets.insert(0, "msp")
    for name in sets:
        gate.signal_set(name)  # unknown names stop here, before any attack
    if point is not None:
        force_point(bundle, gate, sets, point)
    test = load_splits(bundle)["test"]
    n = min(int(images), len(test))
    if n < 1:
        raise ConfigError("need at least one test image")
    pixels_all = to_pixels(test.images[:n])
    labels_all = np.asarray(test.labels[:n])
    clean = judge(gate, bundle, pixels_all, labels_all, gate.default_set)  # only "wrong" is read
    keep = np.flatnonzero(~clean["wrong"])
    pixels, labels = pixels_all[keep], labels_all[keep]
    model = gate.extractor.model
    specs = load_mutants(bundle, model, verify=False).specs if gate.extractor.ensemble is not None else ()
    known = list(specs[:attack_mutants])
    redrawn = redraw_mutants(model, specs, attack_mutants, seed=10_000 + seed) if specs else []
    spec = AdaptiveSpec(eps=eps, steps=steps, lam=lam, operating_point=point)
    pgd = AttackSpec("pgd-linf", eps=eps, steps=steps, alpha=spec.step_size)
    result: dict[str, Any] = {
        "bundle_id": bundle.manifest.get("bundle_id", bundle.path.name),
        "images": n,
        "clean_correct": len(keep),
        "eps": eps,
        "steps": steps,
        "step_size": spec.step_size,
        "lam": lam,
        "kappa": spec.kappa,
        "delta": spec.delta,
        "attack_mutants": attack_mutants,
        "mutants_in_bundle": len(specs),
        "square_queries": square_queries,
        "verdict_tries": verdict_tries,
        "point": point,
        "n_boot": n_boot,
        "sets": {},
    }
    start = time.perf_counter()
    adv_pgd = _attack_chunks(
        lambda x, y, i: attack_batch(pgd, model, bundle.normalisation, to_uint8(x), y.numpy(), seed=seed + i),
        pixels,
        labels,
        chunk,
        progress,
        "pgd (gate ignored)",
    )
    seconds_pgd = time.perf_counter() - start
    # Black box: Square on the CNN's probabilities (what an answer carries), retried with fresh
    # seeds; the attacker keeps the first try whose verdict is "accept". Same images for every set.
    square = AttackSpec("square", eps=eps, steps=square_queries)
    start = time.perf_counter()
    adv_square = [
        _attack_chunks(
            lambda x, y, i, t=t: attack_batch(
                square, model, bundle.normalisation, to_uint8(x), y.numpy(), seed=seed + 1000 * (t + 1) + i
            ),
            pixels,
            labels,
            chunk,
            progress,
            f"square try {t + 1}/{verdict_tries}",
        )
        for t in range(verdict_tries)
    ]
    seconds_square = time.perf_counter() - start
    verdicts: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for name in sets:
        signals = gate.signal_set(name).signals
        variants: dict[str, list[Any]] = {"pgd": [], "blackbox": []}
        not_differentiable = differentiable(gate.signal_set(name))
        if not_differentiable is not None:
            log.warning("signal set %s: no adaptive attack (%s)", name, not_differentiable)
        elif "lcr" in signals:
            variants["adaptive-known"] = known
            variants["adaptive-redrawn"] = redrawn
        else:
            variants["adaptive"] = []
        entry: dict[str, Any] = {
            "signals": list(signals),
            "operating_point": point or gate.signal_set(name).default_point,
            "not_attacked_adaptively": not_differentiable,
            "attacks": {},
        }
        clean_v = judge(gate, bundle, pixels, labels, name, point=point)
        entry["clean_rejection"] = float(clean_v["rejected"].mean())
        entry["clean_rejection_ci"] = _rate_ci(clean_v["rejected"].astype(float), n_boot, seed)
        verdicts[name] = {}
        for variant, mutants in variants.items():
            t0 = time.perf_counter()
            if variant == "pgd":
                adv = adv_pgd
                seconds = seconds_pgd
            elif variant == "blackbox":
                tries = [judge(gate, bundle, a, labels, name, point=point) for a in adv_square]
                ok = [t["wrong"] & ~t["rejected"] for t in tries]
                # per image: the first accepted-and-wrong try, else the last try
                pick = np.full(len(labels), len(tries) - 1)
                for t in reversed(range(len(tries))):
                    pick[ok[t]] = t
                adv = torch.stack([adv_square[t][i] for i, t in enumerate(pick)])
                seconds = seconds_square
            else:
                dgate = DifferentiableGate(gate, bundle.normalisation, name, mutants)
                adv = _attack_chunks(
                    lambda x, y, i, dgate=dgate: adaptive_pgd(dgate, x, y, spec, seed=seed + i),
                    pixels,
                    labels,
                    chunk,
                    progress,
                    f"{variant} vs {name}",
                )
                seconds = time.perf_counter() - t0
            v = judge(gate, bundle, adv, labels, name, point=point)
            verdicts[name][variant] = v
            survive = v["wrong"] & ~v["rejected"]
            entry["attacks"][variant] = {
                "success_rate": float(v["wrong"].mean()),
                "survival_rate": float(survive.mean()),
                "survival_ci": _rate_ci(survive.astype(float), n_boot, seed),
                "rejected_among_fooled": float(v["rejected"][v["wrong"]].mean())
                if v["wrong"].any()
                else None,
                "max_linf": float((adv - pixels).abs().max()),
                "seconds": seconds,
            }
            log.info("%s %s: success %.3f survival %.3f", name, variant, v["wrong"].mean(), survive.mean())
        result["sets"][name] = entry
    # An attacker keeps, per image, whichever of its attacks got through ("any"); each row is
    # compared with MSP under the same kind of attack, and "any" with MSP's "any".
    survive = {
        name: {variant: v["wrong"] & ~v["rejected"] for variant, v in by_variant.items()}
        for name, by_variant in verdicts.items()
    }
    for name, by_variant in survive.items():
        by_variant["any"] = np.logical_or.reduce(list(by_variant.values()))
        result["sets"][name]["attacks"]["any"] = {
            "success_rate": float(np.logical_or.reduce([v["wrong"] for v in verdicts[name].values()]).mean()),
            "survival_rate": float(by_variant["any"].mean()),
            "survival_ci": _rate_ci(by_variant["any"].astype(float), n_boot, seed),
            "rejected_among_fooled": None,
            "max_linf": None,
            "seconds": sum(r["seconds"] for r in result["sets"][name]["attacks"].values()),
        }
    for name, by_variant in survive.items():
        for variant, mine in by_variant.items():
            same = variant if variant in ("pgd", "blackbox", "any") else "adaptive"
            ref = survive["msp"].get(same, survive["msp"]["any"])
            result["sets"][name]["attacks"][variant]["vs_msp"] = _paired_diff(mine, ref, n_boot, seed)
    (bundle.path / REPORT_DIR).mkdir(exist_ok=True)
    files = adaptive_report_files(eps, point)
    (bundle.path / files["json"]).write_text(json.dumps(result, indent=2))
    write_markdown(result, bundle.path / files["md"], Path(files["png"]).name)
    write_plot(result, bundle.path / files["png"])
    return result


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def write_markdown(result: dict[str, Any], path: Path, plot_name: str) -> None:
    lines = [
        f"# Attacks that know the gate: `{result['bundle_id']}`",
        "",
        (
            f"{result['clean_correct']} correctly classified images of the first {result['images']} test "
            f"images; l-inf eps {result['eps']:g}, {result['steps']} steps of {result['step_size']:.4g} "
            f"(random start); adaptive loss weight {result['lam']:g}; the attacker differentiates "
            f"{result['attack_mutants']} mutants (the bundle holds {result['mutants_in_bundle']}); black "
            f"box: Square with {result['square_queries']} queries on the CNN's probabilities, "
            f"{result['verdict_tries']} tries, the first accepted kept. Judged by the real gate on the uint8 "
            "rounding at "
            + (
                f"the point `{result['point']}` of every set (equal clean coverage on val)"
                if result.get("point")
                else "each set's default operating point"
            )
            + f"; 95% CIs from {result['n_boot']} bootstrap "
            "resamples."
        ),
        "",
        (
            "**Survival** = the answer is wrong and the gate accepts it. Difference to MSP: the set's "
            "survival minus MSP's under the same kind of attack (PGD that ignores the gate, the attack "
            "adaptive to that set, or `any`: per image whichever attack got through), paired; below 0 means "
            "the set lets fewer wrong answers through than MSP."
        ),
        "",
        (
            "| signal set | attack | clean rejection | success | rejected "
            "among fooled | survival [95% CI] | vs MSP [95% CI] | s |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in result["sets"].items():
        for variant, r in entry["attacks"].items():
            ci, d = r["survival_ci"], r["vs_msp"]
            lines.append(
                f"| {name} | {variant} | {_pct(entry['clean_rejection'])} | {_pct(r['success_rate'])} | "
                f"{_pct(r['rejected_among_fooled'])} | {_pct(r['survival_rate'])} [{_pct(ci[0])}, "
                f"{_pct(ci[1])}] | {100 * d['diff']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}] "
                f"| {r['seconds']:.0f} |"
            )
    skipped = [
        f"`{n}` ({e['not_attacked_adaptively']})"
        for n, e in result["sets"].items()
        if e.get("not_attacked_adaptively")
    ]
    if skipped:
        lines += ["", "Not attacked adaptively (only PGD on the CNN): " + "; ".join(skipped) + "."]
    lines += ["", f"![survival]({plot_name})", ""]
    path.write_text("\n".join(lines))


def write_plot(result: dict[str, Any], path: Path) -> None:
    names = list(result["sets"])
    variants = sorted(
        {v for e in result["sets"].values() for v in e["attacks"]}, key=lambda v: (v != "pgd", v)
    )
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6))
    width = 0.8 / len(variants)
    for j, variant in enumerate(variants):
        xs, ys, errs = [], [], []
        for i, name in enumerate(names):
            r = result["sets"][name]["attacks"].get(variant)
            if r is None:
                continue
            xs.append(i + j * width)
            ys.append(100 * r["survival_rate"])
            errs.append(
                [
                    100 * (r["survival_rate"] - r["survival_ci"][0]),
                    100 * (r["survival_ci"][1] - r["survival_rate"]),
                ]
            )
        ax.bar(xs, ys, width, label=variant, yerr=np.array(errs).T if errs else None, capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, fontsize=8)
    ax.set_ylabel("wrong and accepted (%)")
    ax.set_title(f"l-inf eps {result['eps']:g}, {result['steps']} steps", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument(
        "--sets",
        nargs="+",
        default=None,
        help="signal sets to attack (default: msp, cond+lcr and the bundle's default set)",
    )
    parser.add_argument(
        "--images", type=int, default=300, help="first N test images (the correct ones are attacked)"
    )
    parser.add_argument("--eps", type=float, default=0.1, help="l-inf radius in [0, 1] pixel units")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lam", type=float, default=1.0, help="weight of the hide-from-the-gate term")
    parser.add_argument(
        "--attack-mutants",
        type=int,
        default=10,
        help="mutants the attacker differentiates (known: the bundle's first N; redrawn: N of its own)",
    )
    parser.add_argument(
        "--square-queries",
        type=int,
        default=500,
        help="queries of each black-box Square try (on the CNN's probabilities)",
    )
    parser.add_argument(
        "--verdict-tries",
        type=int,
        default=3,
        help="black-box tries; the attacker keeps the first the gate accepts",
    )
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--point",
        default=None,
        metavar="SPEC",
        help="judge (and attack) every set at this operating point, chosen on its val scores where not "
        "stored; e.g. correct-recall=0.8: every set rejects 20%% of correct val images (equal coverage)",
    )


def run(args: argparse.Namespace, progress: bool) -> None:
    adaptive_report(
        load_bundle(args.bundle),
        sets=args.sets,
        images=args.images,
        eps=args.eps,
        steps=args.steps,
        lam=args.lam,
        attack_mutants=args.attack_mutants,
        square_queries=args.square_queries,
        verdict_tries=args.verdict_tries,
        chunk=args.chunk,
        n_boot=args.n_boot,
        seed=args.seed,
        point=args.point,
        progress=progress,
    )
    report = args.bundle / adaptive_report_files(args.eps, args.point)["md"]
    print(f"adaptive-attack report written to {report}")

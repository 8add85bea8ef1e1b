"""``python -m bench.cascade``: does a second bundle deciding the first one's ``unknown`` images pay?

The server's cascade (``cascade_bundle``) answers an image with the primary gate when it accepts,
else with the cascade gate when that accepts, else ``unknown`` (the fallback). This bench measures,
on the primary bundle's test split (the same images for both models; the cascade bundle must have
been built on the same data and splits, so neither CNN trained on them):

- (a) the primary alone at its serving operating point, (b) the cascade model alone at its point,
  (c) the cascade system;
- coverage (share accepted), selective accuracy (correct among accepted), overall accuracy if every
  answer's label counted, the share still going to the fallback;
- cost per image in forward-equivalents of the primary CNN (each signal set priced in its own CNN's
  forwards by :func:`models.costs.stage_costs`, measured here; the measured forward ratio converts the
  cascade's) and wall time per image of the real gates on this CPU;
- paired bootstrap 95% CIs (same resampled images for both sides) of the differences in selective
  accuracy and coverage between the system and each model alone.

Verdicts come from the scores each build stored for the test split (seed 0, the served detector);
a parity check runs both live gates on the first images and stops if their verdicts differ.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import finish
from models.bundle import SCORES_FILE, Bundle, load_bundle, scores_key
from models.costs import signal_set_cost, stage_costs
from models.data import load_splits
from models.gate import Gate, load_gate
from models.metrics import bootstrap_indices

SIDES = ("primary", "cascade", "system")


def _check_same_task(primary: Bundle, second: Bundle) -> None:
    """Same classes, input, data and test split: otherwise the comparison is not paired (or is unfair)."""
    problems = []
    if primary.class_names != second.class_names:
        problems.append("class names differ")
    if primary.input_shape != second.input_shape:
        problems.append(f"input shapes differ ({primary.input_shape} vs {second.input_shape})")
    if primary.manifest["dataset"].get("source") != second.manifest["dataset"].get("source"):
        problems.append("data sources differ")
    if primary.manifest.get("splits") != second.manifest.get("splits"):
        problems.append(
            "splits differ (seed or sizes): the cascade's CNN may have trained on the primary's test images"
        )
    if problems:
        raise SystemExit(f"bench.cascade: {primary.path} and {second.path}: " + "; ".join(problems))


def _verdicts(bundle: Bundle, signal_set: str | None, point: str | None) -> dict[str, Any]:
    """The stored test-split predictions and the served detector's reject decisions at ``point``."""
    detectors = bundle.detectors
    if detectors is None or not bundle.has_file(SCORES_FILE):
        raise SystemExit(
            f"bench.cascade: {bundle.path} is not finished (no detectors or scores); build it first"
        )
    info = detectors.signal_set(signal_set)
    gate_point = load_gate_point(bundle, info.name, point)
    features = bundle.read_features("test")
    scores = bundle.read_arrays(SCORES_FILE)[scores_key(0, info.name, "test")]
    return {
        "signal_set": info.name,
        "operating_point": gate_point["name"],
        "threshold": gate_point["threshold"],
        "prediction": features["prediction"].astype(np.int64),
        "label": features["label"].astype(np.int64),
        "scores": scores,
        "reject": scores > gate_point["threshold"],
    }


def load_gate_point(bundle: Bundle, signal_set: str, point: str | None) -> dict[str, Any]:
    """The operating point the server would use: ``point`` or the set's default."""
    assert bundle.detectors is not None
    info = bundle.detectors.signal_sets[signal_set]
    name = point or info.default_point
    if name not in info.operating_points:
        raise SystemExit(
            f"bench.cascade: {bundle.path} set {signal_set}: no point {name!r}; stored: "
            f"{sorted(info.operating_points)}"
        )
    return {"name": name, "threshold": float(info.operating_points[name]["threshold"])}


def _stage_costs(
    gate: Gate, bundle: Bundle, images: np.ndarray, signal_set: str, repeats: int
) -> dict[str, float]:
    """This gate's stage costs on ``images`` measured now (:func:`models.costs.stage_costs`), and the
    forward-equivalents (of its own CNN) per verdict with ``signal_set``: both models are priced in the
    same process under the same load, rather than taken from two reports made at different times."""
    costs = stage_costs(gate.extractor, bundle.normalisation.apply(images), repeats=repeats)
    return {**costs, "verdict_fe": signal_set_cost(gate.signal_set(signal_set).signals, costs)}


def _parity(gate: Gate, bundle: Bundle, images: np.ndarray, side: dict[str, Any]) -> int:
    """Live gate on ``images`` (the first test images) must reject exactly what the stored scores reject."""
    out = gate.run(
        bundle.normalisation.apply(images),
        signal_set=side["signal_set"],
        operating_point=side["operating_point"],
    )
    n = len(images)
    if not (
        np.array_equal(out.reject, side["reject"][:n])
        and np.array_equal(out.prediction, side["prediction"][:n])
    ):
        raise SystemExit(f"bench.cascade: {bundle.path}: the live gate disagrees with the stored test scores")
    return n


def _wall_per_image(
    gates: dict[str, Gate],
    bundles: dict[str, Bundle],
    sides: dict[str, dict[str, Any]],
    images: np.ndarray,
    batch_size: int,
    repeats: int,
) -> dict[str, float]:
    """Median over ``repeats`` of wall seconds per image: each gate alone on ``images``, and the system
    (primary on all, the cascade gate on the primary's rejects of each batch), as the server runs it."""

    def run(name: str, x: np.ndarray) -> Any:
        side = sides[name]
        return gates[name].run(
            bundles[name].normalisation.apply(x),
            signal_set=side["signal_set"],
            operating_point=side["operating_point"],
        )

    def alone(name: str) -> None:
        for start in range(0, len(images), batch_size):
            run(name, images[start : start + batch_size])

    def system() -> None:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            rejected = run("primary", batch).reject
            if rejected.any():
                run("cascade", batch[rejected])

    calls = {"primary": lambda: alone("primary"), "cascade": lambda: alone("cascade"), "system": system}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):  # interleaved, so load that drifts on a shared machine hits all three alike
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / len(images))
    return {name: statistics.median(values) for name, values in times.items()}


def _answers(primary: dict[str, Any], second: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Per side: accepted (bool) and correct (bool: the answer's label equals the true label)."""
    label = primary["label"]
    p_ok, c_ok = primary["prediction"] == label, second["prediction"] == label
    p_acc, c_acc = ~primary["reject"], ~second["reject"]
    by_cascade = ~p_acc & c_acc
    return {
        "primary": {"accepted": p_acc, "correct": p_ok},
        "cascade": {"accepted": c_acc, "correct": c_ok},
        # the server's label: the cascade's where it decided, the primary's otherwise (also when unknown)
        "system": {
            "accepted": p_acc | c_acc,
            "correct": np.where(by_cascade, c_ok, p_ok),
            "by_cascade": by_cascade,
        },
    }


def _figures(accepted: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    n_acc = int(accepted.sum())
    return {
        "coverage": float(accepted.mean()),
        "selective_accuracy": float((accepted & correct).sum() / n_acc) if n_acc else float("nan"),
        "overall_accuracy": float(correct.mean()),
        "fallback_share": float(1.0 - accepted.mean()),
        "accepted_errors_share": float((accepted & ~correct).mean()),
    }


def _bootstrap(answers: dict[str, dict[str, np.ndarray]], n_boot: int, seed: int) -> dict[str, Any]:
    """Paired percentile CIs of system minus each model alone, for selective accuracy and coverage."""
    n = len(answers["system"]["accepted"])
    diffs: dict[str, list[np.ndarray]] = {
        f"{m}_vs_{o}": [] for o in ("primary", "cascade") for m in ("selective_accuracy", "coverage")
    }
    for idx in bootstrap_indices(n, n_boot, seed):
        rows = np.repeat(np.arange(idx.shape[0]), n)
        counts = (
            np.bincount(rows * n + idx.ravel(), minlength=idx.shape[0] * n)
            .reshape(idx.shape[0], n)
            .astype(float)
        )
        per: dict[str, dict[str, np.ndarray]] = {}
        for side in SIDES:
            acc, ok = answers[side]["accepted"], answers[side]["correct"]
            n_acc = counts @ acc
            with np.errstate(invalid="ignore", divide="ignore"):
                per[side] = {"selective_accuracy": (counts @ (acc & ok)) / n_acc, "coverage": n_acc / n}
        for other in ("primary", "cascade"):
            for metric in ("selective_accuracy", "coverage"):
                diffs[f"{metric}_vs_{other}"].append(per["system"][metric] - per[other][metric])
    out = {}
    for name, chunks in diffs.items():
        values = np.concatenate(chunks)
        values = values[np.isfinite(values)]
        low, high = np.percentile(values, [2.5, 97.5])
        out[name] = [float(low), float(high)]
    return out


def measure(
    primary_path: Path,
    cascade_path: Path,
    *,
    primary_set: str | None = None,
    primary_point: str | None = None,
    cascade_set: str | None = None,
    cascade_point: str | None = None,
    n_boot: int = 1000,
    timing_images: int = 256,
    batch_size: int = 32,
    repeats: int = 3,
    threads: int | None = None,
    parity_images: int = 64,
) -> dict[str, Any]:
    if threads is not None:
        torch.set_num_threads(threads)
    bundles = {"primary": load_bundle(primary_path), "cascade": load_bundle(cascade_path)}
    _check_same_task(bundles["primary"], bundles["cascade"])
    sides = {
        "primary": _verdicts(bundles["primary"], primary_set, primary_point),
        "cascade": _verdicts(bundles["cascade"], cascade_set, cascade_point),
    }
    if not np.array_equal(sides["primary"]["label"], sides["cascade"]["label"]):
        raise SystemExit("bench.cascade: the two bundles' test labels differ: not the same test images")
    images = load_splits(bundles["primary"])["test"].images
    if len(images) != len(sides["primary"]["label"]):
        raise SystemExit("bench.cascade: the reloaded test split does not match the stored test features")
    gates = {name: load_gate(b, "cpu", sides[name]["signal_set"]) for name, b in bundles.items()}
    checked = min(parity_images, len(images))
    for name in ("primary", "cascade"):
        _parity(gates[name], bundles[name], images[:checked], sides[name])
    answers = _answers(sides["primary"], sides["cascade"])
    figures = {side: _figures(answers[side]["accepted"], answers[side]["correct"]) for side in SIDES}
    figures["system"]["decided_by_cascade_share"] = float(answers["system"]["by_cascade"].mean())

    stages = {
        name: _stage_costs(
            gates[name], bundles[name], images[:batch_size], sides[name]["signal_set"], repeats
        )
        for name in ("primary", "cascade")
    }
    fwd_p, fwd_c = stages["primary"]["forward_s"], stages["cascade"]["forward_s"]
    ratio = fwd_c / fwd_p
    cost_p, cost_c = stages["primary"]["verdict_fe"], stages["cascade"]["verdict_fe"]
    reject_share = float(sides["primary"]["reject"].mean())
    costs = {"primary": cost_p, "cascade": cost_c * ratio, "system": cost_p + reject_share * cost_c * ratio}
    timing = images[: min(timing_images, len(images))]
    wall = _wall_per_image(gates, bundles, sides, timing, batch_size, repeats)
    for side in SIDES:
        figures[side]["cost_fe"] = costs[side]
        figures[side]["wall_ms_per_image"] = 1000.0 * wall[side]
    return {
        "primary": {
            "bundle": str(primary_path),
            "bundle_id": bundles["primary"].manifest["bundle_id"],
            **{k: sides["primary"][k] for k in ("signal_set", "operating_point", "threshold")},
            "cost_fe_own": cost_p,
        },
        "cascade": {
            "bundle": str(cascade_path),
            "bundle_id": bundles["cascade"].manifest["bundle_id"],
            **{k: sides["cascade"][k] for k in ("signal_set", "operating_point", "threshold")},
            "cost_fe_own": cost_c,
        },
        "n_test": len(images),
        "parity_checked_images": checked,
        "forward_seconds": {"primary": fwd_p, "cascade": fwd_c, "ratio": ratio, "batch_size": batch_size},
        "stage_costs": stages,
        "timing": {
            "images": len(timing),
            "batch_size": batch_size,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
        },
        "figures": figures,
        "n_boot": n_boot,
        "ci95_system_minus": _bootstrap(answers, n_boot, seed=0),
    }


def markdown(result: dict[str, Any]) -> str:
    p, c, f, ci = result["primary"], result["cascade"], result["figures"], result["ci95_system_minus"]
    lines = [
        (
            f"Test split: {result['n_test']} images. Primary `{p['bundle']}` ({p['signal_set']} at "
            f"{p['operating_point']}), cascade `{c['bundle']}` ({c['signal_set']} at "
            f"{c['operating_point']}). Cost in forward passes of the primary CNN (the cascade CNN's forward "
            f"= {result['forward_seconds']['ratio']:.2f} of them); wall time per image of the gates on this "
            f"CPU ({result['timing']['images']} images, batches of {result['timing']['batch_size']}, "
            f"{result['timing']['threads']} threads, median of {result['timing']['repeats']})."
        ),
        "",
        (
            "| | coverage | selective accuracy | overall accuracy | to "
            "fallback | accepted errors | cost (fwd-eq) | wall ms/image |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "primary": "(a) primary alone",
        "cascade": "(b) cascade model alone",
        "system": "(c) cascade system",
    }
    for side in SIDES:
        r = f[side]
        lines.append(
            f"| {names[side]} | {r['coverage']:.4f} | {r['selective_accuracy']:.4f} | "
            f"{r['overall_accuracy']:.4f} | {r['fallback_share']:.4f} | {r['accepted_errors_share']:.4f} | "
            f"{r['cost_fe']:.1f} | {r['wall_ms_per_image']:.2f} |"
        )
    lines += [
        "",
        f"System minus each model alone (paired bootstrap, {result['n_boot']} resamples, 95% CI): ",
    ]
    for other in ("primary", "cascade"):
        d_sel = f["system"]["selective_accuracy"] - f[other]["selective_accuracy"]
        d_cov = f["system"]["coverage"] - f[other]["coverage"]
        s, v = ci[f"selective_accuracy_vs_{other}"], ci[f"coverage_vs_{other}"]
        lines.append(
            f"- vs {other}: selective accuracy {d_sel:+.4f} [{s[0]:+.4f}, {s[1]:+.4f}], "
            f"coverage {d_cov:+.4f} [{v[0]:+.4f}, {v[1]:+.4f}]"
        )
    lines.append(f"- share decided by the cascade: {f['system']['decided_by_cascade_share']:.4f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cascade", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--primary", type=Path, required=True, help="the first bundle (the server's --bundle)"
    )
    parser.add_argument("--cascade", type=Path, required=True, help="the second bundle (cascade_bundle)")
    parser.add_argument("--primary-signal-set", default=None)
    parser.add_argument("--primary-operating-point", default=None)
    parser.add_argument("--cascade-signal-set", default=None)
    parser.add_argument("--cascade-operating-point", default=None)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--timing-images", type=int, default=256, help="test images the wall-time runs use")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--parity-images", type=int, default=64, help="first test images run through both live gates"
    )
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--markdown", default=None, help="write the table as markdown here")
    args = parser.parse_args(argv)
    result = measure(
        args.primary,
        args.cascade,
        primary_set=args.primary_signal_set,
        primary_point=args.primary_operating_point,
        cascade_set=args.cascade_signal_set,
        cascade_point=args.cascade_operating_point,
        n_boot=args.n_boot,
        timing_images=args.timing_images,
        batch_size=args.batch_size,
        repeats=args.repeats,
        threads=args.threads,
        parity_images=args.parity_images,
    )
    code = finish(result, "bench.cascade", argv, args.out, markdown)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(result))
    return code


if __name__ == "__main__":
    raise SystemExit(main())

"""Fill a review outbox the way a deployment would, for measuring ``predgate build --reviews``.

A camera's stream drifts: some images are clean, many are corrupted (the open-world evaluation kinds
at a random severity each), a few show no class at all (scikit-learn's digits, upscaled). The images
are Fashion-MNIST test images the bundle never used (outside its test split). They are sent as PNG
through the real server (``POST /predict/batch``, the review page on, no fallback URL), so every
``unknown`` answer lands in the outbox as it would live; then a reviewer who knows the truth labels
every waiting item through the review API (``PUT /review/items/{key}/label``): the true class, or
"none of these" for a digit. The reviewer is an oracle: real reviewers make mistakes, which this
measurement leaves out.

    python examples/simulate_reviews.py fill --bundle bundles/fashion-mnist-quick --out data/reviews-sim
    predgate build --from bundles/fashion-mnist-quick --out bundles/fashion-mnist-reviewed \\
        --redo detectors --reviews data/reviews-sim
    python examples/simulate_reviews.py evaluate --bundle bundles/fashion-mnist-reviewed \\
        --json reports/fashion-mnist/reviews/stream.json

``evaluate`` draws a second stream from the other half of the unused images (and of the digits), which
nobody reviewed, and scores it with both sets of the refitted bundle: the base set and its refit.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from tqdm import tqdm

from models.bundle import load_bundle
from models.data import DataSource, Splits
from models.gate import load_gate
from models.metrics import accept_lowest, paired_selective_accuracy
from offline.corruptions import corrupt_images
from offline.open_world_suites import EVAL_KINDS
from offline.review_refit import auroc_comparison, baseline_scores
from offline.unknown_inputs import digits
from service.main import create_app
from service.settings import Settings


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def stream(
    bundle_path: Path, n: int, seed: int, shares: tuple[float, float, float], part: tuple[int, int] = (0, 1)
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` images (uint8 HWC), their true labels (-1: no class) and what each is (clean / kind@severity /
    digits), drawn from test-pool images outside the bundle's test split; ``part`` (K, N): only from the
    K-th of N disjoint parts of those images, so a stream to review and a stream to evaluate on share none."""
    bundle = load_bundle(bundle_path, verify=False)
    source = DataSource(**bundle.manifest["dataset"]["source"])
    _, test_pool = source.load()
    splits = Splits.from_dict(bundle.manifest["splits"])
    used = set(splits.indices["test"].tolist()) if splits.pools["test"] == "test" else set()
    free = np.array([i for i in range(len(test_pool.labels)) if i not in used])
    free = np.array_split(np.random.default_rng(1234).permutation(free), part[1])[part[0]]
    rng = np.random.default_rng(seed)
    n_clean, n_shift = int(n * shares[0]), int(n * shares[1])
    n_unknown = n - n_clean - n_shift
    picked = rng.choice(free, n_clean + n_shift, replace=False)
    images, labels = test_pool.images[picked].copy(), test_pool.labels[picked].copy()
    what = ["clean"] * len(picked)
    for i in range(n_clean, len(picked)):
        kind, severity = EVAL_KINDS[rng.integers(len(EVAL_KINDS))], int(rng.integers(1, 6))
        images[i] = corrupt_images(images[i : i + 1], kind, severity, seed=int(rng.integers(2**31)))[0]
        what[i] = f"{kind}@{severity}"
    unknown = digits(n_unknown, images.shape[1:], seed, part)
    order = rng.permutation(len(picked) + n_unknown)
    all_images = np.concatenate([images, unknown])[order]
    all_labels = np.concatenate([labels, np.full(n_unknown, -1)])[order]
    return all_images, all_labels, [(what + ["digits"] * n_unknown)[i] for i in order]


def _part(text: str) -> tuple[int, int]:
    k, n = (int(v) for v in text.split("/"))
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--pool-part {text}: need K/N with 0 <= K < N")
    return k, n


def fill(args: argparse.Namespace) -> None:
    """Send a stream through the server and review every ``unknown`` answer with the truth."""
    if (args.out / "outbox.sqlite3").exists():
        raise SystemExit(f"{args.out} already holds an outbox: give a new --out")
    images, labels, what = stream(args.bundle, args.images, args.seed, tuple(args.shares), args.pool_part)
    settings = Settings(bundle=args.bundle, review=True, fallback_dir=args.out, warmup=False, device="cpu")
    truth: dict[str, int] = {}
    sent = {"unknown": 0, "accept": 0}
    with TestClient(create_app(settings)) as client:
        for start in tqdm(range(0, len(images), args.batch), desc="predict", unit="batch"):
            stop = min(start + args.batch, len(images))
            files = [("files", (f"{i}.png", png(images[i]), "image/png")) for i in range(start, stop)]
            answer = client.post("/predict/batch", files=files)
            answer.raise_for_status()
            for offset, record in enumerate(answer.json()):
                sent[record["verdict"]] += 1
                if record["verdict"] == "unknown":
                    truth[record["fallback_item"]] = int(labels[start + offset])
        for key, label in tqdm(truth.items(), desc="review", unit="item"):
            body: dict[str, object] = {"none_of_these": True} if label < 0 else {"label": label}
            body["reviewer"] = "oracle"
            client.put(f"/review/items/{key}/label", json=body).raise_for_status()
        estimate = client.get("/review/items", params={"limit": 1}).json()["estimate"]
    print(
        json.dumps(
            {"sent": sent, "reviewed": len(truth), "stream": _kinds(what), "estimate": estimate}, indent=1
        )
    )


def _kinds(what: list[str]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for w in what:
        kinds[w.split("@")[0]] = kinds.get(w.split("@")[0], 0) + 1
    return kinds


def _gate_scores(
    bundle_path: Path, signal_set: str | None, images: np.ndarray, batch: int
) -> dict[str, np.ndarray]:
    bundle = load_bundle(bundle_path)
    gate = load_gate(bundle, "cpu", default_set=signal_set)
    parts: dict[str, list[np.ndarray]] = {"score": [], "reject": [], "prediction": [], "logits": []}
    for start in tqdm(range(0, len(images), batch), desc=f"gate {signal_set or 'default'}", unit="batch"):
        out = gate.run(bundle.normalisation.apply(images[start : start + batch]))
        parts["score"].append(out.unified_score)
        parts["reject"].append(out.reject)
        parts["prediction"].append(out.prediction)
        parts["logits"].append(out.logits)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _selective(wrong: np.ndarray, reject: np.ndarray) -> dict[str, float]:
    accepted = ~reject
    return {
        "coverage": float(accepted.mean()),
        "selective_accuracy": float(1 - wrong[accepted].mean()) if accepted.any() else float("nan"),
        "accepted_wrong": int((accepted & wrong).sum()),
        "rejected_right": int((reject & ~wrong).sum()),
    }


def evaluate(args: argparse.Namespace) -> None:
    """Both sets of the refitted bundle (the base set and its refit) on a fresh stream nobody reviewed:
    AUROC against the base, MSP and DOCTOR with paired CIs, and every score at the base gate's coverage
    with a paired CI of the selective-accuracy difference."""
    images, labels, what = stream(args.bundle, args.images, args.seed, tuple(args.shares), args.pool_part)
    bundle = load_bundle(args.bundle)
    after = bundle.manifest["detectors"]["default_set"]
    before = bundle.manifest["detectors"]["signal_sets"][after]["refit_of"]["served"]
    runs = {name: _gate_scores(args.bundle, name, images, args.batch) for name in (before, after)}
    wrong = labels != runs[before]["prediction"]
    others = {"base": runs[before]["score"], **baseline_scores(runs[before]["logits"])}
    # every score accepting as many stream images as the base gate does at its operating point
    n_accepted = int((~runs[before]["reject"]).sum())
    at_base_coverage = {"base": ~runs[before]["reject"]}
    at_base_coverage.update(
        {
            name: accept_lowest(score, n_accepted)
            for name, score in {"reviewed": runs[after]["score"], **others}.items()
            if name != "base"
        }
    )
    regimes = {
        "all": np.ones(len(labels), bool),
        "clean": np.array([w == "clean" for w in what]),
        "shifted": np.array([w not in ("clean", "digits") for w in what]),
        "no class": np.array([w == "digits" for w in what]),
    }
    result: dict[str, object] = {
        "images": len(labels),
        "stream": _kinds(what),
        "pool_part": list(args.pool_part),
        "seed": args.seed,
        "base_set": before,
        "refit_set": after,
        "bundle": str(args.bundle.name),
        "base_coverage": n_accepted / len(labels),
    }
    for regime, mask in regimes.items():
        row: dict[str, object] = {"n": int(mask.sum()), "wrong": int(wrong[mask].sum())}
        row["at_own_threshold"] = {
            name: _selective(wrong[mask], runs[name]["reject"][mask]) for name in (before, after)
        }
        row["at_base_coverage"] = {
            name: _selective(wrong[mask], ~acc[mask]) for name, acc in at_base_coverage.items()
        }
        if regime == "all":
            row["refit_minus_at_base_coverage"] = {
                name: paired_selective_accuracy(at_base_coverage["reviewed"], acc, wrong)
                for name, acc in at_base_coverage.items()
                if name != "reviewed"
            }
        if wrong[mask].any() and (~wrong[mask]).any():
            row["auroc"] = auroc_comparison(
                runs[after]["score"][mask], {k: v[mask] for k, v in others.items()}, wrong[mask], 1000, 0
            )
        result[regime] = row
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("fill", fill), ("evaluate", evaluate)):
        cmd = sub.add_parser(name, help=func.__doc__)
        cmd.add_argument(
            "--bundle",
            type=Path,
            required=True,
            help="fill: the bundle to serve; evaluate: the bundle built with --reviews",
        )
        cmd.add_argument("--images", type=int, default=4000)
        cmd.add_argument(
            "--shares", type=float, nargs=3, default=(0.4, 0.5, 0.1), metavar=("CLEAN", "SHIFT", "UNKNOWN")
        )
        cmd.add_argument("--seed", type=int, default=0)
        cmd.add_argument("--batch", type=int, default=32)
        cmd.add_argument(
            "--pool-part",
            type=_part,
            default=(0, 2) if name == "fill" else (1, 2),
            metavar="K/N",
            help="which of N disjoint parts of the unused test images (default: fill 0/2, evaluate 1/2)",
        )
        cmd.set_defaults(func=func)
    sub.choices["fill"].add_argument(
        "--out", type=Path, required=True, help="fallback directory for the outbox"
    )
    sub.choices["evaluate"].add_argument("--json", type=Path, required=True, help="where the figures go")
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

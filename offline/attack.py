"""``predgate attack``: adversarial versions of a bundle's test split, written into the bundle.

    predgate attack --bundle bundles/fashion-mnist-quick --attack pgd-linf --eps 0.1 --steps 10 --images 500

``--split fit`` / ``--split val`` attack those splits instead (stored as ``fit-<tag>`` / ``val-<tag>``):
the rows a detector fitted with adversarial examples learns from (``predgate robustness
--adv-exposure``), never the images it is measured on.

Outputs go to ``BUNDLE/adversarial/<tag>/chunk-NNNNN.npz`` (``index`` into the attacked split,
``pixels`` float32 ``N x C x H x W`` in [0, 1] as the attack returned them, ``images`` the uint8
rounding a PNG would carry, ``clean_prediction`` and ``adv_prediction`` of the rounded image).
Each chunk is attacked with its own seed (``seed + chunk``), so an interrupted run resumes at the
first missing chunk and gives the same images as an uninterrupted one. The summary (success rate:
share of the correctly classified test images whose rounded adversarial version is misclassified)
is recorded in the manifest under ``adversarial.<tag>``.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.attacks import ATTACKS, AttackSpec, attack_batch, predict_pixels, to_pixels, to_uint8
from models.bundle import (
    ADVERSARIAL_DIR,
    Bundle,
    adversarial_chunk_file,
    adversarial_chunk_prefix,
    load_bundle,
)
from models.data import load_splits
from models.errors import ConfigError
from models.preprocess import Normalisation
from offline.ray_engine import (
    RayEngine,
    add_engine_arguments,
    chunk_rows,
    engine_from,
    ray_module,
    resolve,
    tag_rows,
)

log = logging.getLogger("predgate.attack")


SPLITS = ("test", "fit", "val")


def stored_tag(tag: str, split: str) -> str:
    """Where an attack on ``split`` is stored: the attack's own tag for the test split, else the split's
    name in front, so adversarial rows a detector may learn from never mix with measured ones."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; attack one of {list(SPLITS)}")
    return tag if split == "test" else f"{split}-{tag}"


def attacked_split(bundle: Bundle, tag: str) -> str:
    """The split the stored attack ``tag`` was made on (``test`` for records made before splits)."""
    record = (bundle.get(ADVERSARIAL_DIR) or {}).get(tag)
    if record is None:
        raise ConfigError(
            f"bundle has no adversarial images under {ADVERSARIAL_DIR}/{tag}: run predgate attack first"
        )
    return str(record["settings"].get("split", "test"))


def run_attack(
    bundle: Bundle,
    spec: AttackSpec,
    *,
    split: str = "test",
    images: int | None = None,
    chunk_size: int = 100,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    engine: RayEngine | None = None,
) -> dict[str, Any]:
    """Attack the first ``images`` images of ``split`` (all when None) chunk by chunk; returns the
    summary.

    With a Ray ``engine`` the missing chunks run on its actors, each seeded as here (``seed +
    chunk``), so the stored images are the same; ``seconds`` is then the wall time of the pool."""
    tag = stored_tag(spec.tag, split)
    data = load_splits(bundle)[split]
    n = len(data) if images is None else min(int(images), len(data))
    if n < 1 or chunk_size < 1:
        raise ConfigError(f"need at least one image and chunk size >= 1, got {n} and {chunk_size}")
    record = (bundle.get(ADVERSARIAL_DIR) or {}).get(tag)
    settings: dict[str, Any] = {"spec": spec.to_dict(), "seed": seed, "chunk_size": chunk_size}
    if split != "test":
        settings["split"] = split
    if record is not None and record["settings"] != settings:
        raise ConfigError(
            f"{ADVERSARIAL_DIR}/{tag} was made with {record['settings']}, not {settings}: "
            "rerun with the same settings or remove its files"
        )
    chunks = range(-(-n // chunk_size))
    seconds = float(record["seconds"]) if record else 0.0
    missing = [c for c in chunks if not _chunk_stored(bundle, tag, c)]

    def store(chunk: int, arrays: dict[str, np.ndarray], took: float) -> None:
        nonlocal seconds
        seconds += took
        bundle.write_arrays(adversarial_chunk_file(tag, chunk), arrays)
        bundle.set(
            ADVERSARIAL_DIR,
            {**(bundle.get(ADVERSARIAL_DIR) or {}), tag: {"settings": settings, "seconds": seconds}},
        )
        bundle.save()

    if engine is not None and missing:
        ray = ray_module()
        engine.start()
        start = time.perf_counter()
        kwargs = {
            "bundle_path": str(bundle.path),
            "spec": asdict(spec),
            "images": ray.put(data.images),
            "labels": ray.put(data.labels),
            "chunk_size": chunk_size,
            "seed": seed,
        }
        for out in tqdm(
            engine.map_chunks(AttackWorker, kwargs, missing),
            total=len(missing),
            desc=f"attack {tag} (ray)",
            disable=not progress,
            unit="chunk",
        ):
            now = time.perf_counter()
            store(
                int(out["chunk"][0]), {k: out[k] for k in CHUNK_COLUMNS}, now - start
            )  # wall time, all actors
            start = now
    elif missing:
        model = bundle.load_model(device).eval()
        for chunk in tqdm(missing, desc=f"attack {tag}", disable=not progress, unit="chunk"):
            idx = np.arange(chunk * chunk_size, min((chunk + 1) * chunk_size, len(data)))
            start = time.perf_counter()
            chunk_arrays = attack_chunk(
                spec, model, bundle.normalisation, data.images, data.labels, idx, seed + chunk, device
            )
            store(chunk, chunk_arrays, time.perf_counter() - start)
    table = load_adversarial(bundle, tag, n)
    correct = table["clean_prediction"] == data.labels[table["index"]]
    fooled = correct & (table["adv_prediction"] != data.labels[table["index"]])
    summary = {
        "settings": settings,
        "images": len(table["index"]),
        "clean_correct": int(correct.sum()),
        "success_rate": float(fooled.sum() / max(int(correct.sum()), 1)),
        "adv_accuracy": float((table["adv_prediction"] == data.labels[table["index"]]).mean()),
        "seconds": seconds,
        "seconds_per_image": seconds / max(len(table["index"]), 1),
    }
    bundle.set(ADVERSARIAL_DIR, {**(bundle.get(ADVERSARIAL_DIR) or {}), tag: summary})
    bundle.save()
    return summary


CHUNK_COLUMNS = ("index", "pixels", "images", "clean_prediction", "adv_prediction")


def _chunk_stored(bundle: Bundle, tag: str, chunk: int) -> bool:
    name = adversarial_chunk_file(tag, chunk)
    return bundle.has_file(name) and (bundle.path / name).exists()


def attack_chunk(
    spec: AttackSpec,
    model: torch.nn.Module,
    normalisation: Normalisation,
    images: np.ndarray,
    labels: np.ndarray,
    idx: np.ndarray,
    seed: int,
    device: str,
) -> dict[str, np.ndarray]:
    """One chunk's stored columns (:data:`CHUNK_COLUMNS`): the same for the local and the Ray path."""
    adv = attack_batch(spec, model, normalisation, images[idx], labels[idx], seed=seed, device=device)
    rounded = to_uint8(adv)
    return {
        "index": idx,
        "pixels": adv.numpy().astype(np.float32),
        "images": rounded,
        "clean_prediction": predict_pixels(model, normalisation, to_pixels(images[idx])),
        "adv_prediction": predict_pixels(model, normalisation, to_pixels(rounded)),
    }


class AttackWorker:
    """A Ray actor holding the bundle's CNN; one call attacks one chunk (see :func:`attack_chunk`)."""

    def __init__(
        self,
        bundle_path: str,
        spec: dict[str, Any],
        images: np.ndarray,
        labels: np.ndarray,
        chunk_size: int,
        seed: int,
        device: str,
    ) -> None:
        bundle = load_bundle(bundle_path)
        self.model = bundle.load_model(device).eval()
        self.normalisation, self.spec, self.device = bundle.normalisation, AttackSpec(**spec), device
        self.images, self.labels, self.chunk_size, self.seed = (
            resolve(images),
            resolve(labels),
            chunk_size,
            seed,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunk = int(batch["id"][0])
        idx = chunk_rows(chunk, self.chunk_size, len(self.images))
        out = attack_chunk(
            self.spec,
            self.model,
            self.normalisation,
            self.images,
            self.labels,
            idx,
            self.seed + chunk,
            self.device,
        )
        return tag_rows(chunk, out)


def load_adversarial(bundle: Bundle, tag: str, images: int | None = None) -> dict[str, np.ndarray]:
    """The stored chunks of ``tag`` concatenated (first ``images`` rows)."""
    names = sorted(k for k in bundle.manifest["files"] if k.startswith(adversarial_chunk_prefix(tag)))
    if not names:
        raise ConfigError(
            f"bundle has no adversarial images under {ADVERSARIAL_DIR}/{tag}: run predgate attack first"
        )
    parts = [bundle.read_arrays(k) for k in names]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if images is not None:
        out = {k: v[:images] for k, v in out.items()}
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--attack", required=True, choices=list(ATTACKS))
    parser.add_argument("--eps", type=float, default=0.1, help="l-inf or l2 radius in [0, 1] pixel units")
    parser.add_argument("--steps", type=int, default=10, help="iterations (queries for square)")
    parser.add_argument("--alpha", type=float, default=None, help="step size (default 2.5 * eps / steps)")
    parser.add_argument("--cw-c", type=float, default=1.0, help="C&W: weight of the misclassification term")
    parser.add_argument("--cw-lr", type=float, default=0.01, help="C&W: Adam learning rate")
    parser.add_argument(
        "--split",
        default="test",
        choices=list(SPLITS),
        help="the split to attack: test (measured), or fit / val (rows for --adv-exposure detectors)",
    )
    parser.add_argument("--images", type=int, default=None, help="first N images (default: all)")
    parser.add_argument("--chunk-size", type=int, default=100, help="images per resumable chunk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    add_engine_arguments(parser)


def spec_from(args: argparse.Namespace) -> AttackSpec:
    return AttackSpec(
        args.attack, eps=args.eps, steps=args.steps, alpha=args.alpha, cw_c=args.cw_c, cw_lr=args.cw_lr
    )


def run(args: argparse.Namespace, progress: bool) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = spec_from(args)
    summary = run_attack(
        load_bundle(args.bundle),
        spec,
        split=args.split,
        images=args.images,
        chunk_size=args.chunk_size,
        seed=args.seed,
        device=args.device,
        progress=progress,
        engine=engine_from(args),
    )
    tag = stored_tag(spec.tag, args.split)
    print(
        f"{tag}: {summary['images']} images, success rate {summary['success_rate']:.4f} "
        f"(of {summary['clean_correct']} correctly classified), adversarial accuracy "
        f"{summary['adv_accuracy']:.4f}, {summary['seconds_per_image'] * 1000:.1f} ms/image -> "
        f"{args.bundle / ADVERSARIAL_DIR / tag}"
    )

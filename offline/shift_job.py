"""``predgate shift``: write the open-world suites themselves (images and labels), to look at them or
to send them through a running server.

    predgate shift --bundle bundles/fashion-mnist-quick --images 300 --preview

Writes ``BUNDLE/shift/<suite>.npz`` (``images``: N x H x W x C uint8, ``labels``: int64, -1 for
unknown inputs) for the clean pick of test images, every corruption kind x severity, every unknown
set and the mixed setting: exactly the suites ``predgate open-world`` measures with the same
``--images`` and seed, plus ``index.json`` (suite, regime, kind, severity, count). A suite already
written is kept, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from models.bundle import SHIFT_DIR, SHIFT_INDEX_FILE, SHIFT_PREVIEW_FILE, load_bundle, shift_suite_file
from models.data import load_splits
from offline.corruptions import SEVERITIES
from offline.open_world_job import write_preview
from offline.open_world_suites import EVAL_KINDS, evaluation_suites
from offline.unknown_inputs import unknown_sets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--images", type=int, default=300, help="test images per suite (and per unknown set)")
    parser.add_argument("--kinds", nargs="+", default=list(EVAL_KINDS), choices=list(EVAL_KINDS))
    parser.add_argument(
        "--severities", nargs="+", type=int, default=list(SEVERITIES), choices=list(SEVERITIES)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help=f"folder (default: BUNDLE/{SHIFT_DIR})")
    parser.add_argument(
        "--cifar10-root", default=None, help="CIFAR-10 npz folder (unknown set of a grey bundle)"
    )
    parser.add_argument(
        "--fashion-mnist-root", default=None, help="Fashion-MNIST folder (unknown set of a colour one)"
    )
    parser.add_argument("--preview", action="store_true", help="also write preview.png (one image per suite)")
    parser.add_argument(
        "--held-out-class",
        default=None,
        metavar="DIR",
        help=(
            "folder of images of a class the bundle was not "
            "trained on (an image-folder bundle's near unknown set)"
        ),
    )


def write_suites(
    bundle_path: Path,
    *,
    images: int,
    kinds: tuple[str, ...],
    severities: tuple[int, ...],
    seed: int = 0,
    out: Path | None = None,
    data_roots: dict[str, str | None] | None = None,
    progress: bool = True,
) -> Path:
    """Write every suite as npz with an index; returns the folder."""
    bundle = load_bundle(bundle_path)
    test = load_splits(bundle)["test"]
    folder = Path(out) if out is not None else bundle.path / SHIFT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    suites = evaluation_suites(
        test.images,
        test.labels,
        images=images,
        kinds=kinds,
        severities=severities,
        dataset=bundle.manifest["dataset"]["name"],
        seed=seed,
        data_roots=data_roots,
    )
    index = []
    for suite in tqdm(suites, desc="shift suites", disable=not progress, unit="suite"):
        path = folder / shift_suite_file(suite.name)
        if not path.exists():
            tmp = path.with_name(path.name + ".partial")
            with open(tmp, "wb") as handle:  # a handle: savez would append its own suffix to a name
                np.savez_compressed(
                    handle, images=suite.images.astype(np.uint8), labels=suite.labels.astype(np.int64)
                )
            tmp.replace(path)
        index.append(
            {
                "suite": suite.name,
                "regime": suite.regime,
                "kind": suite.kind,
                "severity": suite.severity,
                "count": len(suite.images),
                "file": path.name,
            }
        )
    settings = {"images": images, "kinds": list(kinds), "severities": list(severities), "seed": seed}
    (folder / SHIFT_INDEX_FILE).write_text(json.dumps({"settings": settings, "suites": index}, indent=2))
    return folder


def run(args: argparse.Namespace, progress: bool) -> None:
    roots = {
        "cifar10": args.cifar10_root,
        "fashion-mnist": args.fashion_mnist_root,
        "held-out-class": args.held_out_class,
    }
    folder = write_suites(
        args.bundle,
        images=args.images,
        kinds=tuple(args.kinds),
        severities=tuple(args.severities),
        seed=args.seed,
        out=args.out,
        data_roots=roots,
        progress=progress,
    )
    if args.preview:
        bundle = load_bundle(args.bundle)
        test = load_splits(bundle)["test"]
        unknown = unknown_sets(
            6, test.image_shape, dataset=bundle.manifest["dataset"]["name"], data_roots=roots
        )
        write_preview(test.images, unknown, folder / SHIFT_PREVIEW_FILE)
    print(f"suites written to {folder} ({SHIFT_INDEX_FILE} lists them)")

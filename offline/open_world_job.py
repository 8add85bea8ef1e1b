"""``predgate open-world``: the open-world evaluation of a finished bundle, written into its report.

    predgate open-world --bundle bundles/fashion-mnist-quick --images 300

Evidence per suite is cached in the bundle (``open_world/``), so an interrupted run resumes; the
figures go to ``BUNDLE/report/open_world.md`` (+ JSON, PNGs). ``--preview`` also writes a PNG grid
of one image per corruption kind and severity and of each unknown set, to look at what was measured.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from models.bundle import OPEN_WORLD_REPORT, REPORT_DIR, load_bundle
from models.data import load_splits
from offline.corruptions import SEVERITIES, corrupt_images
from offline.open_world import adopt, run_open_world
from offline.open_world_report import write_open_world_report
from offline.open_world_suites import EVAL_KINDS, EXPOSURE_KINDS
from offline.unknown_inputs import unknown_sets

log = logging.getLogger("predgate.open_world")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--images", type=int, default=300, help="test images per suite (and per unknown set)")
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=list(EVAL_KINDS),
        choices=list(EVAL_KINDS),
        help="corruption kinds to evaluate (exposure kinds are never evaluated)",
    )
    parser.add_argument(
        "--severities", nargs="+", type=int, default=list(SEVERITIES), choices=list(SEVERITIES)
    )
    parser.add_argument(
        "--exposure-images",
        type=int,
        default=1000,
        help="fit and val images each given exposure corruptions for the exposed variant",
    )
    parser.add_argument("--seeds", type=int, default=3, help="detector seeds")
    parser.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates per CI")
    parser.add_argument(
        "--cifar10-root", default=None, help="CIFAR-10 npz folder (unknown set of a grey bundle)"
    )
    parser.add_argument(
        "--fashion-mnist-root", default=None, help="Fashion-MNIST folder (unknown set of a colour one)"
    )
    parser.add_argument("--preview", action="store_true", help="also write a PNG grid of the suites")
    parser.add_argument(
        "--held-out-class",
        default=None,
        metavar="DIR",
        help=(
            "folder of images of a class the bundle was not "
            "trained on (an image-folder bundle's near unknown set)"
        ),
    )
    parser.add_argument(
        "--adopt",
        nargs="*",
        default=None,
        metavar="VARIANT/SET",
        help="store these evaluated sets (e.g. exposed/feat+softmax) and the scorers in the bundle, "
        "servable; with no value: the set the report chooses",
    )
    parser.add_argument(
        "--make-default",
        action="store_true",
        help="with --adopt: the report's chosen set becomes the bundle's default signal set",
    )


def write_preview(images: np.ndarray, shape_unknown: dict[str, np.ndarray], path: Path) -> None:
    """One test image under every corruption kind x severity, and four images of each unknown set."""
    kinds = list(EVAL_KINDS) + list(EXPOSURE_KINDS)
    rows = len(kinds) + len(shape_unknown)
    fig, axes = plt.subplots(rows, 6, figsize=(6 * 1.1, rows * 1.1))
    grey = images.shape[3] == 1
    show = (lambda a: a[..., 0]) if grey else (lambda a: a)
    for r, kind in enumerate(kinds):
        axes[r, 0].imshow(show(images[0]), cmap="gray" if grey else None)
        axes[r, 0].set_ylabel(
            kind + (" *" if kind in EXPOSURE_KINDS else ""), fontsize=6, rotation=0, ha="right", va="center"
        )
        for s in SEVERITIES:
            if kind == "saturate" and grey:
                continue
            axes[r, s].imshow(
                show(corrupt_images(images[:1], kind, s)[0]), cmap="gray" if grey else None, vmin=0, vmax=255
            )
    for r, (name, imgs) in enumerate(shape_unknown.items(), start=len(kinds)):
        axes[r, 0].set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
        for c in range(min(6, len(imgs))):
            axes[r, c].imshow(show(imgs[c]), cmap="gray" if grey else None, vmin=0, vmax=255)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        "columns: clean, severity 1-5 (* = exposure kind, never evaluated); last rows: unknown sets",
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace, progress: bool) -> None:
    bundle = load_bundle(args.bundle)
    roots = {
        "cifar10": args.cifar10_root,
        "fashion-mnist": args.fashion_mnist_root,
        "held-out-class": args.held_out_class,
    }
    result = run_open_world(
        bundle,
        images=args.images,
        kinds=tuple(args.kinds),
        severities=tuple(args.severities),
        exposure_images=args.exposure_images,
        seeds=args.seeds,
        data_roots=roots,
        progress=progress,
    )
    used = [s["mutants_used"] for s in result.suites.values() if s["mutants_used"] is not None]
    n_used = float(np.mean(np.concatenate(used))) if used else None
    out_dir = bundle.path / REPORT_DIR
    write_open_world_report(
        result, out_dir, bundle.manifest.get("bundle_id", bundle.path.name), n_used, n_boot=args.n_boot
    )
    if args.preview:
        test = load_splits(bundle)["test"]
        dataset = bundle.manifest["dataset"]["name"]
        unknown = unknown_sets(6, test.image_shape, dataset=dataset, data_roots=roots)
        write_preview(test.images, unknown, out_dir / OPEN_WORLD_REPORT["suites_plot"])
    print(f"open-world report written to {out_dir / OPEN_WORLD_REPORT['markdown']}")
    if args.adopt is not None:
        chosen = json.loads((out_dir / OPEN_WORLD_REPORT["json"]).read_text())["default"]["chosen"]
        keys = list(args.adopt) or ([chosen] if chosen else [])
        if args.make_default and chosen not in keys:
            keys.append(chosen)
        names = adopt(bundle, result, keys, default=chosen if args.make_default else None)
        print(
            f"adopted signal sets {names}"
            + (f"; default is now {names[keys.index(chosen)]}" if args.make_default else "")
        )

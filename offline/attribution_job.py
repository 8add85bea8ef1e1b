"""``predgate attribution``: attribution maps of natural vs. robust models on clean vs. adversarial inputs.

    predgate attribution --bundle bundles/fm --compare bundles/fm-robust \\
        --tag pgd-linf-eps0.1-steps10-alpha0.025 --images 200 --out reports/fashion-mnist/attribution

For each model (the bundle, and ``--compare`` if given) and each captum method (saliency,
integrated gradients, Grad-CAM), on the first ``--images`` test images and their stored adversarial
versions of ``--tag`` (``predgate attack``, made against that model):

* **cleanliness** of the clean and of the adversarial input's map (cosine of ``|map|`` with the
  original image, the second seed's measure), mean and bootstrap 95% CI;
* **top-k overlap** between the map of the clean input and of its adversarial version (the fourth
  seed's interpretation discrepancy is one minus it), over all images and over the successful ones;
* whether **attribution instability** (one minus the top-k overlap between the map of an input and
  of the input with small noise: computable from the input alone) separates the successful
  adversarial inputs from the clean correct ones: AUROC against MSP's, with a paired bootstrap CI.

Writes ``attribution.json`` / ``.md`` and one grid PNG per method (rows: model x clean / adversarial;
columns: example images) into ``--out`` (default ``BUNDLE/report``).
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
import torch
from tqdm import tqdm

from models.attribution_metrics import attribution_instability, cleanliness, heat_maps, top_k_overlap
from models.bundle import (
    ATTRIBUTION_JSON_NAME,
    ATTRIBUTION_MARKDOWN_NAME,
    REPORT_DIR,
    Bundle,
    attribution_grid_name,
    load_bundle,
)
from models.data import load_splits
from models.errors import ConfigError
from models.explanations import METHODS, Explainer
from models.gate import load_extractor
from models.metrics import bootstrap_indices, paired_bootstrap_auroc
from offline.attack import load_adversarial

log = logging.getLogger("predgate.attribution")
EXAMPLES = 6


def _mean_ci(values: np.ndarray, n_boot: int, seed: int = 0) -> dict[str, Any]:
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return {"mean": None, "ci": None, "n": 0}
    means = np.concatenate([values[idx].mean(axis=1) for idx in bootstrap_indices(len(values), n_boot, seed)])
    return {
        "mean": float(values.mean()),
        "ci": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
        "n": len(values),
    }


def _explainer(bundle: Bundle, ig_steps: int) -> Explainer:
    extractor = load_extractor(bundle)
    if extractor.conductance is None:
        raise ConfigError(f"bundle {bundle.path} has no conductance layer; Grad-CAM and IG need it")
    layer = str(bundle.manifest["conductance"]["layer"])
    return Explainer(extractor.model, layer, extractor.conductance, bundle.normalisation, ig_steps=ig_steps)


def evaluate_model(
    bundle: Bundle,
    tag: str,
    *,
    images: int,
    methods: list[str],
    k_share: float,
    noise_std: float,
    ig_steps: int,
    n_boot: int,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """One model's figures, and the maps of the example images (for the grid)."""
    test = load_splits(bundle)["test"]
    table = load_adversarial(bundle, tag, images)
    idx = table["index"]
    clean_images, adv_images, labels = test.images[idx], table["images"], test.labels[idx]
    norm = bundle.normalisation
    x_clean, x_adv = norm.apply(clean_images), norm.apply(adv_images)
    explainer = _explainer(bundle, ig_steps)
    with torch.no_grad():
        p_clean = torch.softmax(explainer.model(x_clean), 1)
        p_adv = torch.softmax(explainer.model(x_adv), 1)
    pred_clean, pred_adv = p_clean.argmax(1).numpy(), p_adv.argmax(1).numpy()
    correct = pred_clean == labels
    fooled = correct & (pred_adv != labels)
    k = max(1, round(k_share * clean_images.shape[1] * clean_images.shape[2]))
    target = np.concatenate([np.zeros(int(correct.sum())), np.ones(int(fooled.sum()))]).astype(int)
    msp = np.concatenate(
        [1 - p_clean.max(1).values.numpy()[correct], 1 - p_adv.max(1).values.numpy()[fooled]]
    )
    examples_at = np.flatnonzero(fooled)[:EXAMPLES]
    out: dict[str, Any] = {
        "bundle": bundle.manifest["bundle_id"],
        "images": len(idx),
        "clean_accuracy": float(correct.mean()),
        "adv_accuracy": float((pred_adv == labels).mean()),
        "successful": int(fooled.sum()),
        "success_rate": float(fooled.sum() / max(int(correct.sum()), 1)),
        "k": k,
        "methods": {},
        "adversarial_training": (bundle.manifest.get("training", {}).get("config") or {}).get("adv_attack"),
    }
    examples: dict[str, dict[str, np.ndarray]] = {}
    for method in tqdm(methods, desc=f"attribution {bundle.path.name}", disable=not progress, unit="method"):
        heat_clean = heat_maps(explainer, x_clean, torch.as_tensor(pred_clean), method)
        heat_adv = heat_maps(explainer, x_adv, torch.as_tensor(pred_adv), method)
        overlap = top_k_overlap(heat_clean, heat_adv, k)
        unstable_clean = attribution_instability(
            explainer, x_clean[correct], method, k=k, noise_std=noise_std
        )
        unstable_adv = attribution_instability(
            explainer, x_adv[fooled], method, k=k, noise_std=noise_std, seed=1
        )
        row: dict[str, Any] = {
            "cleanliness_clean": _mean_ci(cleanliness(heat_clean, clean_images), n_boot),
            "cleanliness_adv": _mean_ci(cleanliness(heat_adv, clean_images), n_boot),
            "top_k_overlap_all": _mean_ci(overlap, n_boot),
            "top_k_overlap_successful": _mean_ci(overlap[fooled], n_boot),
        }
        if 0 < target.sum() < len(target):
            row["instability_vs_msp"] = paired_bootstrap_auroc(
                np.concatenate([unstable_clean, unstable_adv]),
                msp,
                target,
                n_boot=n_boot,
            )
        out["methods"][method] = row
        examples[method] = {
            "images": clean_images[examples_at],
            "adv_images": adv_images[examples_at],
            "clean": heat_clean[examples_at],
            "adv": heat_adv[examples_at],
        }
    return out, examples


def _fmt(stat: dict[str, Any]) -> str:
    if stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.3f} [{stat['ci'][0]:.3f}, {stat['ci'][1]:.3f}]"


def write_markdown(result: dict[str, Any], path: Path) -> None:
    lines = [
        f"# Attribution maps: {result['tag']}",
        "",
        (
            f"First {result['images']} test images; top-k = {result['k_share']:.0%} of the pixels; "
            f"instability noise std {result['noise_std']} (normalised units); bootstrap {result['n_boot']} "
            "replicates, 95% CIs."
        ),
        "",
        "| model | clean acc | adv acc | success rate |",
        "| --- | --- | --- | --- |",
    ]
    for name, m in result["models"].items():
        lines.append(
            f"| {name} | {m['clean_accuracy']:.3f} | {m['adv_accuracy']:.3f} | {m['success_rate']:.3f} |"
        )
    lines += [
        "",
        (
            "| model | method | cleanliness clean | cleanliness adversarial | top-k overlap clean/adv "
            "(successful) | instability AUROC | MSP AUROC | difference [95% CI] |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in result["models"].items():
        for method, r in m["methods"].items():
            inst = r.get("instability_vs_msp")
            auc = (
                (
                    f"{inst['auroc_a']:.3f} | {inst['auroc_b']:.3f} | {inst['diff']:+.3f} "
                    f"[{inst['ci_diff'][0]:+.3f}, {inst['ci_diff'][1]:+.3f}]"
                )
                if inst
                else "- | - | -"
            )
            lines.append(
                f"| {name} | {method} | {_fmt(r['cleanliness_clean'])} | {_fmt(r['cleanliness_adv'])} | "
                f"{_fmt(r['top_k_overlap_successful'])} | {auc} |"
            )
    lines += ["", "Command: `" + result["command"] + "`", ""]
    path.write_text("\n".join(lines))


def write_grid(examples: dict[str, dict[str, dict[str, np.ndarray]]], method: str, path: Path) -> None:
    """Rows: each model's clean input, its map, the adversarial input, its map; columns: examples."""
    rows = [
        (name, kind) for name in examples for kind in ("input", "clean map", "adversarial", "adversarial map")
    ]
    cols = max((len(ex[method]["clean"]) for ex in examples.values()), default=0)
    if cols == 0:
        return
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.4 * cols, 1.4 * len(rows)), squeeze=False)
    for r, (name, kind) in enumerate(rows):
        ex = examples[name][method]
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(ex["clean"]):
                continue
            if kind == "input":
                ax.imshow(ex["images"][c].mean(-1), cmap="gray", vmin=0, vmax=255)
            elif kind == "adversarial":
                ax.imshow(ex["adv_images"][c].mean(-1), cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(ex["clean" if kind == "clean map" else "adv"][c], cmap="inferno")
            if c == 0:
                ax.set_title(f"{name}: {kind}", fontsize=6, loc="left")
    fig.suptitle(f"{method}: natural vs. robust model, clean vs. adversarial input", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attribution_report(
    bundles: dict[str, Bundle],
    tag: str,
    out: Path,
    *,
    images: int = 200,
    methods: list[str] | None = None,
    k_share: float = 0.1,
    noise_std: float = 0.1,
    ig_steps: int = 16,
    n_boot: int = 1000,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    methods = list(methods or METHODS)
    result: dict[str, Any] = {
        "tag": tag,
        "images": images,
        "k_share": k_share,
        "noise_std": noise_std,
        "ig_steps": ig_steps,
        "n_boot": n_boot,
        "models": {},
        "command": command,
    }
    examples = {}
    for name, bundle in bundles.items():
        result["models"][name], examples[name] = evaluate_model(
            bundle,
            tag,
            images=images,
            methods=methods,
            k_share=k_share,
            noise_std=noise_std,
            ig_steps=ig_steps,
            n_boot=n_boot,
            progress=progress,
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / ATTRIBUTION_JSON_NAME).write_text(json.dumps(result, indent=2))
    write_markdown(result, out / ATTRIBUTION_MARKDOWN_NAME)
    for method in methods:
        write_grid(examples, method, out / attribution_grid_name(method))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--compare", type=Path, default=None, help="a second bundle (e.g. the robust model)")
    parser.add_argument(
        "--tag", required=True, help="adversarial folder stored in every bundle (predgate attack)"
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    parser.add_argument("--k-share", type=float, default=0.1, help="top-k as a share of the pixels")
    parser.add_argument("--noise-std", type=float, default=0.1, help="noise of the instability signal")
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="default: BUNDLE/report")


def _name(bundle: Bundle) -> str:
    adv = (bundle.manifest.get("training", {}).get("config") or {}).get("adv_attack")
    return f"{'robust' if adv else 'natural'} ({bundle.path.name})"


def run(args: argparse.Namespace, progress: bool) -> None:
    bundles = [load_bundle(args.bundle)] + ([load_bundle(args.compare)] if args.compare else [])
    named = {_name(b): b for b in bundles}
    if len(named) < len(bundles):
        raise ConfigError("--bundle and --compare must be different bundles")
    out = args.out or (args.bundle / REPORT_DIR)
    command = "predgate attribution " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if k not in ("func", "command", "verbose") and v is not None
    )
    attribution_report(
        named,
        args.tag,
        out,
        images=args.images,
        methods=args.methods,
        k_share=args.k_share,
        noise_std=args.noise_std,
        ig_steps=args.ig_steps,
        n_boot=args.n_boot,
        progress=progress,
        command=command,
    )
    print(f"attribution report written to {out / ATTRIBUTION_MARKDOWN_NAME}")

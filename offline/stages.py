"""The build stages, each adding its part to one bundle and marking itself done.

A stage that is already marked done in the manifest is skipped, so an interrupted build continues
where it stopped (``predgate build`` with the same ``--out``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.architectures import build_model, default_layer
from models.bundle import Bundle, load_bundle
from models.errors import BundleError
from models.preprocess import Normalisation
from offline.data import ImageArrays, Splits, SplitSpec, apply_splits, load_dataset, make_splits
from offline.profiles import BuildProfile
from offline.train import TrainConfig, accuracy, pick_device, train_model

log = logging.getLogger("predgate.build")

# Per-dataset training recipe: flips and crops for natural images only.
AUGMENTATION = {"fashion-mnist": (False, 0), "cifar10": (True, 4), "imagefolder": (True, 4)}


@dataclass
class DataSource:
    """How to reload the data a bundle was built from (recorded in its manifest)."""

    name: str
    root: str | None = None
    image_size: int | None = None
    channels: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def load(self) -> tuple[ImageArrays, ImageArrays]:
        kwargs: dict[str, Any] = {}
        if self.name == "imagefolder":
            kwargs = {"image_size": self.image_size, "channels": self.channels or 3}
        return load_dataset(self.name, self.root, **kwargs)


def load_splits(bundle: Bundle) -> dict[str, ImageArrays]:
    """Reload the four splits a bundle was built on (checked against the recorded digest)."""
    source = DataSource(**bundle.manifest["dataset"]["source"])
    train_pool, test_pool = source.load()
    splits = Splits.from_dict(bundle.manifest["splits"])
    return apply_splits(train_pool, test_pool, splits)


def prepare(
    out: Path,
    source: DataSource,
    profile: BuildProfile,
    *,
    arch: str = "resnet20",
    layer: str | None = None,
    overwrite: bool = False,
) -> tuple[Bundle, dict[str, ImageArrays]]:
    """Create the bundle (or reopen it), cut the splits and record normalisation statistics."""
    manifest_path = Path(out) / "manifest.json"
    if manifest_path.exists() and not overwrite:
        bundle = load_bundle(out)
        recorded = bundle.manifest.get("profile")
        if recorded != profile.to_dict():
            raise BundleError(
                f"{out} was started with profile {recorded}, not {profile.to_dict()}: "
                "use another --out or --overwrite"
            )
        return bundle, load_splits(bundle)
    train_pool, test_pool = source.load()
    spec = SplitSpec(
        cnn_train=profile.cnn_train,
        fit=None if profile.fit_is_cnn_train else profile.fit,
        val=profile.val,
        test=profile.test,
        seed=profile.seed,
        fit_is_cnn_train=profile.fit_is_cnn_train,
        val_from=profile.val_from,  # type: ignore[arg-type]
    )
    splits = make_splits(len(train_pool), len(test_pool), spec)
    arrays = apply_splits(train_pool, test_pool, splits)
    normalisation = Normalisation.from_images(arrays["cnn-train"].images)
    h, w, c = arrays["cnn-train"].image_shape
    bundle = Bundle.create(
        out,
        dataset={"name": source.name, "source": source.to_dict()},
        class_names=train_pool.class_names,
        input_shape=(c, h, w),
        normalisation=normalisation,
        architecture={"name": arch, "num_classes": len(train_pool.class_names), "in_channels": c},
        overwrite=overwrite,
    )
    bundle.set("profile", profile.to_dict())
    bundle.set("splits", splits.to_dict())
    bundle.set("conductance", {"layer": layer or default_layer(arch)})
    bundle.mark_stage("prepare")
    return bundle, arrays


def train_stage(
    bundle: Bundle,
    arrays: dict[str, ImageArrays],
    *,
    epochs: int,
    seed: int = 0,
    resume: bool = True,
    weights: Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> None:
    """Train the CNN on cnn-train (or import given weights) and record its accuracies."""
    if bundle.stage_done("train"):
        return
    arch = bundle.manifest["architecture"]
    model = build_model(arch["name"], arch["num_classes"], arch["in_channels"])
    normalisation = bundle.normalisation
    flip, padding = AUGMENTATION.get(bundle.manifest["dataset"]["name"], (False, 0))
    config = TrainConfig(epochs=epochs, flip=flip, crop_padding=padding, seed=seed)
    torch_device = pick_device(device)
    info: dict[str, Any] = {"device": str(torch_device)}
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.eval()
        info["imported_weights"] = str(Path(weights).name)
    else:
        result = train_model(
            model,
            arrays["cnn-train"],
            normalisation,
            config,
            val=arrays["val"],
            checkpoint=bundle.path / ".work" / "checkpoint.pt",
            resume=resume,
            device=torch_device,
            progress=progress,
        )
        info.update(config=config.to_dict(), history=result.history, wall_seconds=result.wall_seconds)
    model.to("cpu").eval()
    start = time.perf_counter()
    for split in ("cnn-train", "val", "test"):
        x = normalisation.apply(arrays[split].images)
        info[f"{split}_accuracy"] = accuracy(model, x, torch.from_numpy(arrays[split].labels))
    info["eval_seconds"] = time.perf_counter() - start
    bundle.save_model(model)
    bundle.set("training", info)
    bundle.mark_stage("train")

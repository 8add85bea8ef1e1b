"""The build stages, each adding its part to one bundle and marking itself done.

A stage that is already marked done in the manifest is skipped, so an interrupted build continues
where it stopped (``predgate build`` with the same ``--out``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.architectures import (
    ModelSpec,
    check_forward,
    check_input_channels,
    pick_layer,
    resolve_layer,
    timm_preprocessing,
)
from models.bundle import (
    CNN_TRAIN_INDICES_FILE,
    CONDUCTANCE_FILE,
    FEATURE_SPLITS,
    MANIFEST_NAME,
    MUTANTS_FILE,
    SCORES_FILE,
    Bundle,
    ConductanceDetectorInfo,
    DetectorsSection,
    PreprocessingSection,
    SignalSetInfo,
    load_bundle,
    load_features,
    scores_key,
    sha256_file,
    signal_set_stem,
)
from models.conductance import ShortcutConductance, verify_shortcut
from models.data import (
    DataSource,
    ImageArrays,
    SplitSpec,
    apply_splits,
    conform_splits,
    load_splits,
    make_splits,
    read_index_file,
)
from models.detector_state import save_state
from models.devices import resolve_device
from models.errors import BundleError, ConfigError
from models.gate import load_extractor
from models.metrics import wrong_labels
from models.mutant_search import generate_mutants
from models.mutation import mutant_weights_hash
from models.operating_points import choose_threshold
from models.preprocess import Normalisation
from models.sequential_lcr import EarlyStopping, sprt_from_data
from models.signals import PAPER_SET
from offline.features import apply_early_stopping, extract_features
from offline.fit import fit_detectors
from offline.import_weights import ImportedWeights, check_reference, load_into, read_weights
from offline.profiles import STAGE_ORDER, BuildProfile, fixed_fields_differ
from offline.ray_engine import RayEngine, extract_features_on_ray
from offline.train import DEFAULT_LR, TrainConfig, accuracy, build_seeded_model, predict_logits, train_model

log = logging.getLogger("predgate.build")

# Per-dataset training recipe: flips and crops for natural images only.
AUGMENTATION = {"fashion-mnist": (False, 0), "cifar10": (True, 4), "imagefolder": (True, 4)}
ON_AUGMENTATION = (True, 4)  # --augment on: flips and 4-pixel crops


@dataclass(frozen=True)
class ModelRequest:
    """The model a build is for and how its inputs are made (the ``predgate build`` flags).

    ``arch``: resnet20, a torchvision name, ``timm:NAME`` or ``package.module:Class`` (with
    ``arch_kwargs`` and ``code_path``); ``weights``: a file to import instead of training
    (:mod:`offline.import_weights`). ``mean`` / ``std`` (one value or one per channel, in [0, 1] pixel
    units), ``input_size`` and ``channels`` are the model's preprocessing; what is not given comes
    from the timm config (timm models with imported weights), the cnn-train statistics and the data.
    ``exclude_indices``: a file naming the training-file images the CNN was trained on (see
    :func:`models.data.make_splits`). ``expected_accuracy``: what the model's provenance claims (the
    accuracy check warns far below it); ``allow_low_accuracy`` goes on past a near-chance CNN."""

    arch: str = "resnet20"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    code_path: str | None = None
    layer: str | None = None
    weights: Path | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: int | None = None
    channels: int | None = None
    exclude_indices: Path | None = None
    expected_accuracy: float | None = None
    allow_low_accuracy: bool = False

    def recorded(self) -> dict[str, Any]:
        """What the manifest keeps (``model_request``) to refuse a rerun that asks for another model."""
        return {
            "arch": self.arch,
            "arch_kwargs": dict(self.arch_kwargs),
            "code_path": str(Path(self.code_path).resolve()) if self.code_path else None,
            "weights": _file_record(self.weights),
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "input_size": self.input_size,
            "channels": self.channels,
            "exclude_indices": _file_record(self.exclude_indices),
        }

    def is_default(self) -> bool:
        return self.recorded() == ModelRequest(layer=self.layer).recorded()


def _file_record(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    path = Path(path)
    return {"name": path.name, "sha256": sha256_file(path) if path.is_file() else "missing"}


def _per_channel(values: tuple[float, ...] | None, channels: int, flag: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ConfigError(f"{flag} has {len(values)} values; give one, or one per channel ({channels})")
    return values


def _plan_model(
    request: ModelRequest, num_classes: int, data_shape: tuple[int, int, int]
) -> tuple[ModelSpec, nn.Module, dict[str, Any]]:
    """Resolve the architecture and the preprocessing the flags leave open; check that the model takes
    the images and gives one logit per class, before any bundle file is written."""
    h, w, c = data_shape
    channels = request.channels or c
    spec = ModelSpec(
        request.arch, num_classes, channels, dict(request.arch_kwargs), request.code_path
    ).resolved()
    model = spec.build()
    sources = {"channels": "--channels" if request.channels else "the data", "input_size": "--input-size"}
    size = request.input_size
    mean, std = request.mean, request.std
    cfg = timm_preprocessing(model) if request.weights is not None else {}
    if cfg:  # a timm model's config says what its (imported) weights expect
        cfg_c, cfg_h, _ = (int(v) for v in cfg.get("input_size", (channels, h, w)))
        if request.channels is None and cfg_c != channels:
            channels, sources["channels"] = cfg_c, "the timm config"
            spec = ModelSpec(spec.name, num_classes, channels, spec.kwargs, spec.code_path, spec.code_sha256)
            model = spec.build()
        if size is None and "input_size" in cfg:
            size, sources["input_size"] = cfg_h, "the timm config"
        if mean is None and "mean" in cfg:
            mean, sources["mean"] = tuple(cfg["mean"]), "the timm config"
        if std is None and "std" in cfg:
            std, sources["std"] = tuple(cfg["std"]), "the timm config"
    if size is None:
        sources["input_size"] = "the data"
    sources.setdefault("mean", "--mean" if request.mean else "the cnn-train statistics")
    sources.setdefault("std", "--std" if request.std else "the cnn-train statistics")
    input_shape = (channels, size or h, size or w)
    check_input_channels(model, channels, request.arch)
    check_forward(model, input_shape, num_classes, request.arch)
    if request.layer is not None:
        resolve_layer(model, request.layer)
        layer, how = request.layer, "--layer"
    else:
        layer, how = pick_layer(model, request.arch, input_shape)
    plan = {
        "size": size,
        "channels": channels,
        "input_shape": input_shape,
        "layer": layer,
        "layer_chosen_by": how,
        "mean": _per_channel(mean, channels, "--mean"),
        "std": _per_channel(std, channels, "--std"),
        "sources": sources,
    }
    return spec, model, plan


def _check_weights_fit(request: ModelRequest, spec: ModelSpec, model: nn.Module) -> ImportedWeights | None:
    if request.weights is None:
        return None
    imported = read_weights(request.weights)
    load_into(model, imported, spec.name, Path(request.weights).name)
    return imported


def _reopen(out: Path, profile: BuildProfile, request: ModelRequest, redo: str | None) -> Bundle:
    bundle = load_bundle(out)
    # Fields added to profiles after the bundle was started count at their defaults.
    recorded = BuildProfile(**(bundle.manifest.get("profile") or {}))
    differ = fixed_fields_differ(recorded, profile, redo)
    if differ:
        raise BundleError(
            f"{out} was started with {', '.join(f'{k}={getattr(recorded, k)!r}' for k in differ)}, not "
            f"{', '.join(f'{k}={getattr(profile, k)!r}' for k in differ)}: use another --out, --overwrite, "
            "or --redo an earlier stage"
        )
    asked = bundle.manifest.get("model_request")
    if asked is not None and not request.is_default():
        wanted = request.recorded()
        changed = sorted(k for k in wanted if wanted[k] != asked.get(k))
        if changed:
            raise BundleError(
                f"{out} was started for another model or preprocessing "
                f"({', '.join(f'{k}={asked.get(k)!r}' for k in changed)}): use another --out, or --overwrite "
                "to start it afresh"
            )
    layer = request.layer
    recorded_layer = (bundle.manifest.get("conductance") or {}).get("layer")
    if layer is not None and layer != recorded_layer:
        if redo is None or STAGE_ORDER.index(redo) > STAGE_ORDER.index("conductance"):
            raise BundleError(
                f"{out} computes conductance at {recorded_layer!r}, not {layer!r}: "
                "use --redo conductance (or an earlier stage) to change the layer"
            )
        resolve_layer(bundle.model_spec.build(), layer)
        bundle.set("conductance", {"layer": layer, "layer_chosen_by": "--layer"})
        bundle.save()
    if recorded != profile:
        bundle.set("profile", profile.to_dict())
        bundle.save()
    return bundle


def prepare(
    out: Path,
    source: DataSource,
    profile: BuildProfile,
    *,
    arch: str = "resnet20",
    layer: str | None = None,
    overwrite: bool = False,
    redo: str | None = None,
    model: ModelRequest | None = None,
) -> tuple[Bundle, dict[str, ImageArrays]]:
    """Create the bundle (or reopen it), cut the splits and record the model and its preprocessing.

    Everything that can be checked without training is checked before the first file is written: the
    architecture builds, takes the images and gives one logit per class, the conductance layer exists,
    imported weights fit. A bundle whose prepare stage never finished (a failed first attempt) is
    started afresh. Reopening needs the profile and model it was started with, except for the fields
    of the ``redo`` stage and later ones, which are recomputed: the new profile is then recorded.
    ``model`` replaces ``arch`` and ``layer`` when given."""
    request = model or ModelRequest(arch=arch, layer=layer)
    manifest_path = Path(out) / MANIFEST_NAME
    if manifest_path.exists() and not overwrite:
        try:
            started = load_bundle(out, verify=False).stage_done("prepare")
        except BundleError:
            started = False
        if started:
            bundle = _reopen(Path(out), profile, request, redo)
            return bundle, load_splits(bundle)
        log.warning("%s holds an unfinished bundle (its prepare stage never ended): starting it afresh", out)
        overwrite = True
    train_pool, test_pool = source.load()
    named = read_index_file(request.exclude_indices, len(train_pool)) if request.exclude_indices else None
    spec = SplitSpec(
        cnn_train=profile.cnn_train,
        fit=profile.fit,
        val=profile.val,
        test=profile.test,
        seed=profile.seed,
        fit_is_cnn_train=profile.fit_is_cnn_train,
        val_from=profile.val_from,  # type: ignore[arg-type]
    )
    try:
        splits = make_splits(len(train_pool), len(test_pool), spec, named)
    except ValueError as exc:
        raise ConfigError(f"splits: {exc}") from exc
    arrays = apply_splits(train_pool, test_pool, splits)
    data_shape = arrays["cnn-train"].image_shape if len(arrays["cnn-train"]) else train_pool.image_shape
    model_spec, module, plan = _plan_model(request, len(train_pool.class_names), data_shape)
    _check_weights_fit(request, model_spec, module)
    c, h, w = plan["input_shape"]
    if (h, w, c) != tuple(data_shape):
        arrays = conform_splits(arrays, plan["size"], c)
    stats_from = arrays["cnn-train"] if len(arrays["cnn-train"]) else arrays["fit"]
    stats = Normalisation.from_images(stats_from.images)
    normalisation = Normalisation(plan["mean"] or stats.mean, plan["std"] or stats.std)
    if any(v <= 0 for v in normalisation.std):
        raise ConfigError(f"--std must be positive, got {list(normalisation.std)}")
    bundle = Bundle.create(
        out,
        dataset={"name": source.name, "source": source.to_dict()},
        class_names=train_pool.class_names,
        input_shape=(c, h, w),
        normalisation=normalisation,
        architecture=model_spec.to_dict(),
        overwrite=overwrite,
    )
    bundle.set(
        "preprocessing",
        PreprocessingSection(
            mean=normalisation.mean,
            std=normalisation.std,
            input_size=(h, w),
            channels=c,
            data_shape=tuple(data_shape),
            sources=plan["sources"],  # type: ignore[arg-type]
        ).to_dict(),
    )
    bundle.set("model_request", request.recorded())
    bundle.set("profile", profile.to_dict())
    recorded_splits = splits.to_dict()
    if named is not None:
        bundle.write_arrays(CNN_TRAIN_INDICES_FILE, {"indices": named})
        recorded_splits["cnn_train_indices"].update(
            file=CNN_TRAIN_INDICES_FILE,
            given_as=Path(request.exclude_indices or "").name,
        )
    bundle.set("splits", recorded_splits)
    bundle.set("conductance", {"layer": plan["layer"], "layer_chosen_by": plan["layer_chosen_by"]})
    bundle.mark_stage("prepare")
    return bundle, arrays


def train_config(bundle: Bundle, profile: BuildProfile) -> TrainConfig:
    """The training recipe of ``profile`` (its defaults: the data set's augmentation, the optimiser's
    learning rate)."""
    flip, padding = AUGMENTATION.get(bundle.manifest["dataset"]["name"], (False, 0))
    if profile.augment is not None:
        flip, padding = ON_AUGMENTATION if profile.augment else (False, 0)
    return TrainConfig(
        epochs=profile.epochs,
        batch_size=profile.batch_size,
        max_lr=profile.lr or DEFAULT_LR[profile.optimizer],
        weight_decay=profile.weight_decay,
        flip=flip,
        crop_padding=padding,
        seed=profile.seed,
        optimizer=profile.optimizer,
        adv_attack=profile.adv_train,
        adv_eps=profile.adv_eps if profile.adv_train else 0.0,
        adv_steps=profile.adv_steps,
    )


def train_stage(
    bundle: Bundle,
    arrays: dict[str, ImageArrays],
    *,
    epochs: int,
    seed: int = 0,
    batch_size: int = 128,
    resume: bool = True,
    weights: Path | None = None,
    device: str = "auto",
    progress: bool = True,
    profile: BuildProfile | None = None,
) -> None:
    """Train the CNN on cnn-train (or import given weights) and record its accuracies. ``profile``
    gives the training options (optimiser, learning rate, weight decay, augmentation); without it
    the defaults with ``epochs``, ``batch_size`` and ``seed``."""
    if bundle.stage_done("train"):
        return
    model = build_seeded_model(bundle.model_spec, seed=seed)
    normalisation = bundle.normalisation
    profile = profile or BuildProfile(
        epochs=epochs, cnn_train=None, fit=None, val=None, test=None, n_mutants=0
    )
    config = train_config(bundle, replace(profile, epochs=epochs, batch_size=batch_size, seed=seed))
    torch_device = resolve_device(device)
    info: dict[str, Any] = {"device": str(torch_device)}
    if weights is not None:
        file = Path(weights).name
        imported = read_weights(weights)
        load_into(model, imported, bundle.model_spec.name, file)
        model.eval()
        x_check = normalisation.apply(arrays["val"].images[:32])
        rel = check_reference(model, imported, x_check, bundle.model_spec.name, file)
        info["imported_weights"] = file
        info["imported_from"] = {
            **imported.describe(),
            "sha256": sha256_file(Path(weights)),
            **({"reference_max_rel_diff": rel} if rel is not None else {}),
        }
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
        if not len(arrays[split]):
            info[f"{split}_accuracy"] = None
            continue
        x = normalisation.apply(arrays[split].images)
        info[f"{split}_accuracy"] = accuracy(model, x, torch.from_numpy(arrays[split].labels))
    info["eval_seconds"] = time.perf_counter() - start
    bundle.save_model(model)
    bundle.set("training", info)
    bundle.mark_stage("train")


# ------------------------------------------------------------------------------ accuracy check
NORMALISATION_GUESSES = {
    "--mean 0 --std 1 (pixels in [0, 1])": ((0.0,), (1.0,)),
    "--mean 0.5 --std 0.5 (pixels in [-1, 1])": ((0.5,), (0.5,)),
    "--mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 (ImageNet)": (
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    ),
}


@dataclass
class AccuracyCheck:
    """The accuracy check between training and the mutants: ``verdict`` ``ok``, ``warn`` or ``stop``."""

    val_accuracy: float
    chance: float
    top_class_share: float
    verdict: str
    messages: list[str]
    better_normalisation: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _guess_normalisations(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, channels: int, current: Normalisation
) -> dict[str, float]:
    out = {}
    y = torch.from_numpy(labels)
    for flag, (mean, std) in NORMALISATION_GUESSES.items():
        if len(mean) not in (1, channels):
            continue
        norm = Normalisation(
            mean * channels if len(mean) == 1 else mean, std * channels if len(std) == 1 else std
        )
        if norm == current:
            continue
        out[flag] = accuracy(model, norm.apply(images), y)
    return out


def accuracy_check(
    bundle: Bundle,
    arrays: dict[str, ImageArrays],
    *,
    expected: float | None = None,
    allow_low: bool = False,
    probe_images: int = 500,
) -> AccuracyCheck:
    """Check the CNN before any mutant or feature is computed: **stop** (raise) when its val accuracy is
    near chance (within 0.05 of the majority-class share) or it gives one class for >= 95% of val
    images (a degenerate model: nothing for the detectors to learn), unless ``allow_low``; **warn**
    when it is far below ``expected`` (by more than 0.1) or, without ``expected``, below halfway
    between chance and 1. For imported weights the usual other normalisations are tried on val
    images and named in the message when one does much better (a normalisation mismatch)."""
    training = bundle.manifest["training"]
    val = arrays["val"]
    model = bundle.load_model()
    n = min(len(val), probe_images)
    x = bundle.normalisation.apply(val.images[:n])
    with torch.no_grad():
        predictions = predict_logits(model, x).argmax(1).numpy()
    acc = float(training["val_accuracy"])
    counts = np.bincount(val.labels, minlength=len(bundle.class_names))
    chance = float(counts.max() / max(counts.sum(), 1))
    top_share = float(np.bincount(predictions, minlength=len(bundle.class_names)).max() / max(n, 1))
    messages: list[str] = []
    better: dict[str, float] = {}
    if training.get("imported_weights"):
        probe = _guess_normalisations(
            model, val.images[:n], val.labels[:n], bundle.input_shape[0], bundle.normalisation
        )
        probe_acc = float((predictions == val.labels[:n]).mean())
        better = {k: v for k, v in probe.items() if v > probe_acc + 0.1}
    hint = ""
    if better:
        flag, best = max(better.items(), key=lambda kv: kv[1])
        hint = (
            f" With {flag} the model gets {best:.1%} of val images right: it was probably trained with that "
            "normalisation; rerun with those flags and --overwrite."
        )
    collapsed = top_share >= 0.95 and chance < 0.95
    if acc <= chance + 0.05 or collapsed:
        why = f"gives one class for {top_share:.0%} of val images" if collapsed else "is near chance"
        messages.append(
            f"the CNN's val accuracy is {acc:.1%} (chance: {chance:.1%}) and it {why}: its errors are not "
            "something a detector can learn."
            + (hint or " Check --mean/--std, --input-size, --channels and the class order, or train longer.")
        )
        verdict = "stop"
    elif expected is not None and acc < expected - 0.1:
        messages.append(
            f"the CNN's val accuracy is {acc:.1%}, far below the {expected:.1%} claimed for it."
            + (hint or " Check that --mean/--std, --input-size and --channels are those it was trained with.")
        )
        verdict = "warn"
    elif expected is None and acc < (1 + chance) / 2:
        messages.append(f"the CNN's val accuracy is low: {acc:.1%} (chance: {chance:.1%}).{hint}")
        verdict = "warn"
    elif hint:
        messages.append(hint.strip())
        verdict = "warn"
    else:
        verdict = "ok"
    check = AccuracyCheck(acc, chance, top_share, verdict, messages, better)
    training["accuracy_check"] = check.to_dict()
    bundle.set("training", training)
    bundle.save()
    if verdict == "stop" and not allow_low:
        raise BundleError(
            f"build stopped before the mutants: {messages[0]} (--allow-low-accuracy builds on regardless)"
        )
    return check


# ------------------------------------------------------------------------------ conductance
def conductance_stage(
    bundle: Bundle,
    arrays: dict[str, ImageArrays],
    *,
    n_steps: int = 10,
    rule: str = "left",
    n_check: int = 64,
) -> None:
    """Decide between the exact shortcut and the general form, proving the shortcut on val images."""
    if bundle.stage_done("conductance"):
        return
    model = bundle.load_model()
    layer = bundle.manifest["conductance"]["layer"]
    samples = bundle.normalisation.apply(arrays["val"].images[:n_check])
    info: dict[str, Any] = {"layer": layer, "n_steps": n_steps, "rule": rule, "baseline": "zeros"}
    if "layer_chosen_by" in bundle.manifest["conductance"]:
        info["layer_chosen_by"] = bundle.manifest["conductance"]["layer_chosen_by"]
    try:
        shortcut = ShortcutConductance.from_model(
            model, layer, bundle.input_shape, samples=samples, n_steps=n_steps
        )
    except ConfigError as exc:
        check = verify_shortcut(model, layer, samples, n_steps=n_steps)
        info.update(mode="general", shortcut_refused=str(exc), shortcut_max_rel_diff=check.max_rel_diff)
    else:
        assert shortcut.check_ is not None
        bundle.write_tensors(CONDUCTANCE_FILE, shortcut.state_dict())
        info.update(
            mode="shortcut", shortcut_max_rel_diff=shortcut.check_.max_rel_diff, shortcut_samples=n_check
        )
    bundle.set("conductance", info)
    bundle.mark_stage("conductance", mode=info["mode"])


# ------------------------------------------------------------------------------ mutants
def mutants_stage(
    bundle: Bundle,
    arrays: dict[str, ImageArrays],
    *,
    operator: str,
    rate: float,
    n_mutants: int,
    seed: int = 0,
    modules: tuple[str, ...] | list[str] | None = None,
    acceptance_images: int = 2000,
    progress: bool = True,
) -> None:
    """Generate mutants until ``n_mutants`` keep >= 90% of the original's val accuracy."""
    if bundle.stage_done("mutants"):
        return
    model = bundle.load_model()
    val = arrays["val"]
    n = min(len(val), acceptance_images)
    x_val = bundle.normalisation.apply(val.images[:n])
    start = time.perf_counter()
    mutants = generate_mutants(
        model,
        operator,
        rate,
        n_mutants,
        x_val,
        torch.from_numpy(val.labels[:n]),
        seed=seed,
        progress=progress,
        modules=list(modules) if modules else None,
    )
    bundle.write_json(MUTANTS_FILE, mutants.to_dict())
    filters = mutants.filters_per_mutant
    bundle.set(
        "mutants",
        {
            "operator": operator,
            "rate": rate,
            "modules": list(modules) if modules else None,
            "count": len(mutants.specs),
            "total_filters": mutants.total_filters,
            "filters_per_mutant": sorted(set(filters)),
            "attempts": mutants.attempts,
            "acceptance_rate": mutants.acceptance_rate,
            "acceptance_images": n,
            "original_accuracy": mutants.original_accuracy,
            "kept_accuracy_min": min(mutants.accuracies),
            "kept_accuracy_median": float(sorted(mutants.accuracies)[len(mutants.accuracies) // 2]),
            "weight_hashes": [mutant_weights_hash(model, spec) for spec in mutants.specs],
            "seconds": time.perf_counter() - start,
        },
    )
    bundle.mark_stage("mutants")


# ------------------------------------------------------------------------------ features
def features_stage(
    bundle: Bundle,
    arrays: dict[str, ImageArrays],
    *,
    batch_size: int = 256,
    early_stopping_alpha: float | None = None,
    early_stopping_chunk: int = 10,
    progress: bool = True,
    engine: RayEngine | None = None,
) -> None:
    """Evidence for fit, val and test (resumable per split), then the LCR setting (see
    :func:`lcr_setting_stage`). With a Ray ``engine`` the chunks of each split spread over its
    actors (:mod:`offline.ray_engine`); the columns are the same."""
    extractor = None
    for split in FEATURE_SPLITS:
        stage = f"features:{split}"
        if bundle.stage_done(stage):
            continue
        start = time.perf_counter()
        if engine is not None:
            feats, seconds = extract_features_on_ray(
                engine,
                str(bundle.path),
                arrays[split].images,
                arrays[split].labels,
                with_lcr=bundle.has_file(MUTANTS_FILE),
                batch_size=batch_size,
            )
            bundle.write_features(split, feats)
            bundle.mark_stage(stage, images=len(arrays[split]), seconds=seconds, engine="ray")
            continue
        extractor = extractor or load_extractor(bundle)
        feats = extract_features(
            extractor,
            bundle.normalisation,
            arrays[split],
            with_lcr=extractor.ensemble is not None,
            batch_size=batch_size,
            progress=progress,
            desc=f"features {split}",
        )
        bundle.write_features(split, feats)
        bundle.mark_stage(
            stage, images=len(arrays[split]), seconds=time.perf_counter() - start, engine="local"
        )
    lcr_setting_stage(bundle, alpha=early_stopping_alpha, chunk_size=early_stopping_chunk)


def lcr_setting_stage(bundle: Bundle, *, alpha: float | None, chunk_size: int = 10) -> None:
    """Full LCR, or an SPRT over chunks of mutants whose hypotheses come from the fit split.

    ``alpha`` (= beta) None keeps the full LCR. Otherwise p0 / p1 are the mean full LCR of the fit
    split's correct / wrong predictions, the setting goes into the manifest (``lcr.early_stopping``)
    for the server, and each split's ``lcr`` column becomes the replayed early-stopped LCR, which is
    what the detectors learn from and what the server will compute.
    """
    if bundle.stage_done("features:lcr") or not bundle.has_file(MUTANTS_FILE):
        return
    features = load_features(bundle)
    stopping = None
    if alpha is not None:
        fit = apply_early_stopping(features["fit"], None)
        rule = sprt_from_data(fit["lcr_full"], wrong_labels(fit), alpha=alpha)
        stopping = EarlyStopping(rule, chunk_size=chunk_size)
    used = {}
    for split, columns in features.items():
        updated = apply_early_stopping(columns, stopping)
        bundle.write_features(split, updated)
        used[split] = float(updated["mutants_used"].mean())
    bundle.set(
        "lcr",
        {
            "early_stopping": stopping.to_dict() if stopping is not None else None,
            "mean_mutants_used": used,
            "hypotheses_from": "fit" if stopping is not None else None,
        },
    )
    bundle.mark_stage("features:lcr")


# ------------------------------------------------------------------------------ detectors
OPERATING_POINTS = ("equal-recall", "correct-recall=0.98", "wrong-recall=0.995", "risk=0.02@0.95")


def detectors_stage(
    bundle: Bundle,
    *,
    seeds: int = 3,
    default_set: str | None = None,
    cond_inputs: str = "conductance",
    progress: bool = True,
) -> None:
    """Fit detectors for every signal set over several seeds; store seed 0's with operating points.

    ``cond_inputs`` is what the conductance detector reads: the paper's conductance alone, or
    conductance with the predicted class (recorded, so the gate builds the same inputs)."""
    if bundle.stage_done("detectors"):
        return
    features = load_features(bundle)
    start = time.perf_counter()
    first = fit_detectors(features, seed=0, cond_inputs=cond_inputs, progress=progress)
    fits = [first]
    chosen = {name: s.kind for name, s in first.sets.items()}
    for seed in range(1, seeds):
        fits.append(
            fit_detectors(
                features, seed=seed, chosen_kinds=chosen, cond_inputs=cond_inputs, progress=progress
            )
        )
    wrong_val = wrong_labels(features["val"])

    cond_info = ConductanceDetectorInfo(
        best_val_auroc=first.cond_detector.best_val_auroc_,
        best_epoch=first.cond_detector.best_epoch_,
        trained_on="fit",
        inputs=cond_inputs,
    )
    bundle.write_detector_state(cond_info.stem, *save_state(first.cond_detector))
    sets: dict[str, SignalSetInfo] = {}
    for name, set_fit in first.sets.items():
        stem = signal_set_stem(name)
        bundle.write_detector_state(stem, *save_state(set_fit.classifier))
        points, skipped = {}, {}
        for spec in OPERATING_POINTS:
            try:
                points[spec] = choose_threshold(set_fit.scores["val"], wrong_val, spec).to_dict()
            except ConfigError as exc:
                skipped[spec] = str(exc)
        sets[name] = SignalSetInfo(
            name=name,
            signals=tuple(set_fit.signals),
            stem=stem,
            operating_points=points,
            kind=set_fit.kind,
            val_auroc=set_fit.val_auroc_by_kind[set_fit.kind],
            details={"val_auroc_by_kind": set_fit.val_auroc_by_kind, "skipped_points": skipped},
        )
    scores: dict[str, np.ndarray] = {}
    for fit in fits:
        for split in FEATURE_SPLITS:
            scores[scores_key(fit.seed, "conductance-detector", split)] = fit.cond_scores[split]
            for name, set_fit in fit.sets.items():
                scores[scores_key(fit.seed, name, split)] = set_fit.scores[split]
                for kind, by_split in set_fit.scores_by_kind.items():
                    scores[scores_key(fit.seed, f"{name}@{kind}", split)] = by_split[split]
    bundle.write_arrays(SCORES_FILE, scores)
    if default_set is None:
        default_set = PAPER_SET if PAPER_SET in sets else "cond"
    if default_set not in sets:
        raise ConfigError(f"default signal set {default_set!r} was not fitted; fitted: {sorted(sets)}")
    section = DetectorsSection(
        conductance=cond_info,
        signal_sets=sets,
        default_set=default_set,
        seeds=tuple(fit.seed for fit in fits),
        details={"seconds": time.perf_counter() - start},
    )
    bundle.set("detectors", section.to_dict())
    bundle.mark_stage("detectors")

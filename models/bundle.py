"""The bundle: one versioned directory that offline jobs write and the server loads.

Layout: ``manifest.json`` (a schema-versioned description plus the sha256 of every file) and the
files it names (weights as safetensors, arrays as npz without pickle, JSON). ``load_bundle``
refuses anything it cannot trust, naming the file, so that a server never starts on a bundle that
is half-written, edited by hand or produced by an unknown schema.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save_file as _save_safetensors
from torch import nn

from models import __version__
from models.architectures import ModelSpec
from models.errors import BundleError
from models.preprocess import Normalisation

SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = frozenset({1})

# Every file name of the bundle is spelt here and nowhere else.
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"
CONDUCTANCE_FILE = "conductance.safetensors"  # the proven shortcut's constants
MUTANTS_FILE = "mutants.json"  # the kept mutant specs
SCORES_FILE = "detectors/scores.npz"  # every detector's scores per seed, set and split
CONDUCTANCE_DETECTOR_STEM = "detectors/conductance"
REPORT_DIR = "report"
REPORT_METRICS_FILE = f"{REPORT_DIR}/metrics.json"
SWEEP_FILE = f"{REPORT_DIR}/sweep_mutants.json"
REPORT_MARKDOWN_FILE = f"{REPORT_DIR}/report.md"
ROBUSTNESS_FILE = f"{REPORT_DIR}/robustness.json"
ROBUSTNESS_MARKDOWN_FILE = f"{REPORT_DIR}/robustness.md"
# predgate attribution writes these into its --out folder (default: the bundle's report/).
ATTRIBUTION_JSON_NAME = "attribution.json"
ATTRIBUTION_MARKDOWN_NAME = "attribution.md"


def attribution_grid_name(method: str) -> str:
    """The grid PNG of one attribution method."""
    return f"attribution-{method}.png"


# what a refit from reviewed rejections writes (predgate build --from B --reviews DB)
REVIEWS_REPORT_JSON = f"{REPORT_DIR}/reviews.json"
REVIEWS_REPORT_MARKDOWN = f"{REPORT_DIR}/reviews.md"
REVIEWS_REPORT_PLOT = f"{REPORT_DIR}/reviews_roc.png"
REVIEWS_SECTION = "reviews"  # the manifest section of that refit
FEATURE_SPLITS = ("fit", "val", "test")
CNN_TRAIN_INDICES_FILE = (
    "splits/cnn-train-indices.npz"  # --exclude-indices: the images the CNN was trained on
)
ADVERSARIAL_DIR = "adversarial"  # also the manifest section that records each attack


def adaptive_report_files(eps: float, point: str | None = None) -> dict[str, str]:
    """``predgate adaptive``'s report of the l-inf budget ``eps`` (at operating point ``point`` when
    one is forced on every set): ``json``, ``md`` and ``png`` names."""
    stem = f"{REPORT_DIR}/adaptive-linf-eps{eps:g}" + (f"-{point}" if point else "")
    return {"json": f"{stem}.json", "md": f"{stem}.md", "png": f"{stem}.png"}


def features_file(split: str) -> str:
    """The evidence table of one split (:data:`FEATURE_SPLITS`)."""
    return f"features/{split}.npz"


def signal_set_stem(name: str) -> str:
    """Where signal set ``name``'s unified classifier is stored (``<stem>.json`` + ``<stem>.npz``)."""
    return f"detectors/set-{name}"


OPEN_WORLD_DIR = "open_world"  # also the manifest section of the open-world evaluation
OPEN_WORLD_SCORER_DIR = f"{OPEN_WORLD_DIR}/scorers"  # fitted open-set scorers (models.open_world_evidence)
OPEN_WORLD_REPORT = {  # what predgate open-world writes, file names inside REPORT_DIR
    "markdown": "open_world.md",
    "json": "open_world.json",
    "shift_plot": "open_world_shift.png",
    "unknown_plot": "open_world_unknown.png",
    "suites_plot": "open_world_suites.png",
}


SHIFT_DIR = "shift"  # predgate shift's default output folder inside a bundle
SHIFT_INDEX_FILE = "index.json"  # its index, inside that folder
SHIFT_PREVIEW_FILE = "preview.png"


def shift_suite_file(suite: str) -> str:
    """One suite's images and labels, inside the shift folder."""
    return f"{suite}.npz"


def open_world_scorer_stem(name: str) -> str:
    """One fitted open-set scorer (``<stem>.json`` + ``<stem>.npz``)."""
    return f"{OPEN_WORLD_SCORER_DIR}/{name}"


def open_world_suite_file(suite: str) -> str:
    """The cached evidence of one open-world suite."""
    return f"{OPEN_WORLD_DIR}/evidence/{suite}.npz"


def open_world_split_file(split: str, eps: float, temperature: float) -> str:
    """The open-world columns of a stored split (penultimate features, perturbed DOCTOR at that setting)."""
    return f"{OPEN_WORLD_DIR}/splits/{split}-{eps}-{temperature}.npz"


def open_world_exposure_file(split: str, with_lcr: bool) -> str:
    """The evidence of a split's exposure rows (without LCR when the set that needs them reads none)."""
    suffix = "" if with_lcr else "-no-lcr"
    return f"{OPEN_WORLD_DIR}/exposure/{split}{suffix}.npz"


def variant_conductance_stem(variant: str) -> str:
    """A conductance detector refitted by an open-world variant (e.g. ``exposed``)."""
    return f"{CONDUCTANCE_DETECTOR_STEM}-{variant}"


def adversarial_chunk_prefix(tag: str) -> str:
    return f"{ADVERSARIAL_DIR}/{tag}/chunk-"


def adversarial_chunk_file(tag: str, chunk: int) -> str:
    """One resumable chunk of attack ``tag``'s adversarial images."""
    return f"{adversarial_chunk_prefix(tag)}{chunk:05d}.npz"


def adversarial_evidence_file(tag: str) -> str:
    """The gate's evidence of attack ``tag``'s images, cached by the robustness report."""
    return f"{ADVERSARIAL_DIR}/{tag}/evidence.npz"


def scores_key(seed: int, method: str, split: str) -> str:
    """The key of ``method``'s scores (a signal set, ``conductance-detector``, ``SET@kind``) in
    :data:`SCORES_FILE`."""
    return f"{seed}/{method}/{split}"


REQUIRED_KEYS = (
    "schema_version",
    "package_version",
    "bundle_id",
    "dataset",
    "class_names",
    "input_shape",
    "normalisation",
    "architecture",
    "files",
)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    """The process's umask: from ``/proc`` on Linux (reading it with ``os.umask`` sets it for a moment,
    which another thread could see)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same directory, then rename: no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # mkstemp makes the file 0600; a bundle is read by other users too (the service's container
        # user mounts it read-only), so it gets the mode a plain open() would give under the umask.
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # after the write: a writer may replace the file (safetensors does)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Bundle:
    """A bundle directory and its manifest; stages add files and sections, then ``save()``."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest

    # ----------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        dataset: dict[str, Any],
        class_names: list[str],
        input_shape: tuple[int, int, int],
        normalisation: Normalisation,
        architecture: dict[str, Any],
        overwrite: bool = False,
    ) -> Bundle:
        """Start a new bundle; refuse to write over an existing one unless asked."""
        path = Path(path)
        if (path / MANIFEST_NAME).exists() and not overwrite:
            raise BundleError(f"{path} already holds a bundle; pass overwrite to replace it")
        path.mkdir(parents=True, exist_ok=True)
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "package_version": __version__,
            "bundle_id": f"{path.name}-{uuid.uuid4().hex[:8]}",
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "dataset": dataset,
            "class_names": list(class_names),
            "input_shape": list(input_shape),
            "normalisation": normalisation.to_dict(),
            "architecture": architecture,
            "stages": {},
            "files": {},
        }
        bundle = cls(path, manifest)
        bundle.save()
        return bundle

    def copy_to(self, path: str | Path) -> Bundle:
        """A new bundle at ``path`` holding this one's files, with its own ``bundle_id`` and
        ``derived_from`` naming this one: variants (other detectors, another conductance layer)
        start from the stages they share instead of recomputing them. The copy is made beside
        ``path`` and moved into place, so a failure leaves no half-made bundle."""
        import shutil

        path = Path(path)
        if path.exists():
            raise BundleError(f"{path} already exists; choose a new directory for the copy")
        load_bundle(self.path)  # every file present and unchanged before it is copied
        tmp = path.with_name(f".{path.name}.copying")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            shutil.copytree(self.path, tmp, ignore=shutil.ignore_patterns(".work"))
            copy = Bundle(tmp, json.loads(json.dumps(self.manifest)))
            copy.manifest["bundle_id"] = f"{path.name}-{uuid.uuid4().hex[:8]}"
            copy.manifest["derived_from"] = self.manifest["bundle_id"]
            copy.save()
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Bundle(path, copy.manifest)

    # ----------------------------------------------------------------- files
    def record_file(self, name: str) -> None:
        """Hash a file written by other means (a plot) into the manifest."""
        self.manifest["files"][name] = {"sha256": sha256_file(self.path / name)}

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _atomic_write(self.path / name, lambda tmp: _save_safetensors(clean, str(tmp)))
        self.record_file(name)

    def read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        self._require(name)
        return _load_safetensors(str(self.path / name))

    def write_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, **arrays)

        _atomic_write(self.path / name, write)
        self.record_file(name)

    def read_arrays(self, name: str) -> dict[str, np.ndarray]:
        self._require(name)
        with np.load(self.path / name, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def write_json(self, name: str, obj: Any) -> None:
        text = json.dumps(obj, indent=2, sort_keys=True)
        _atomic_write(self.path / name, lambda tmp: tmp.write_text(text))
        self.record_file(name)

    def read_json(self, name: str) -> Any:
        self._require(name)
        return json.loads((self.path / name).read_text())

    def has_file(self, name: str) -> bool:
        return name in self.manifest["files"]

    def _require(self, name: str) -> None:
        if name not in self.manifest["files"]:
            raise BundleError(f"bundle {self.path} has no file {name!r} in its manifest")

    # ----------------------------------------------------------------- stored evidence and detectors
    def write_features(self, split: str, columns: dict[str, np.ndarray]) -> None:
        self.write_arrays(features_file(split), columns)

    def read_features(self, split: str) -> dict[str, np.ndarray]:
        return self.read_arrays(features_file(split))

    def write_detector_state(self, stem: str, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """A fitted detector as stored: its config (``<stem>.json``) and arrays (``<stem>.npz``)."""
        self.write_json(f"{stem}.json", config)
        self.write_arrays(f"{stem}.npz", arrays)

    def read_detector_state(self, stem: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return self.read_json(f"{stem}.json"), self.read_arrays(f"{stem}.npz")

    @property
    def detectors(self) -> DetectorsSection | None:
        """The manifest's ``detectors`` section, typed (None before the detectors stage ran)."""
        raw = self.manifest.get("detectors")
        return DetectorsSection.from_dict(raw) if raw else None

    # ----------------------------------------------------------------- sections
    def set(self, key: str, value: Any) -> None:
        """Set a manifest section (``mutants``, ``detectors``, ...); persisted by ``save()``."""
        self.manifest[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        return self.manifest.get(key, default)

    def mark_stage(self, stage: str, **info: Any) -> None:
        self.manifest.setdefault("stages", {})[stage] = {
            "done": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            **info,
        }
        self.save()

    def stage_done(self, stage: str) -> bool:
        return stage in self.manifest.get("stages", {})

    def save(self) -> None:
        text = json.dumps(self.manifest, indent=2, sort_keys=True)
        _atomic_write(self.path / MANIFEST_NAME, lambda tmp: tmp.write_text(text))

    # ----------------------------------------------------------------- model
    @property
    def normalisation(self) -> Normalisation:
        return Normalisation.from_dict(self.manifest["normalisation"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.manifest["input_shape"]
        return int(c), int(h), int(w)

    def save_model(self, model: nn.Module) -> None:
        self.write_tensors(WEIGHTS_NAME, model.state_dict())

    @property
    def model_spec(self) -> ModelSpec:
        """The manifest's ``architecture`` section: what rebuilds the module."""
        return ModelSpec.from_dict(self.manifest["architecture"])

    @property
    def preprocessing(self) -> PreprocessingSection | None:
        """The manifest's ``preprocessing`` section (None in bundles made before it existed, whose
        model reads the data set's own images)."""
        raw = self.manifest.get("preprocessing")
        return PreprocessingSection.from_dict(raw) if raw else None

    def load_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """Rebuild the architecture and load the weights; the model is returned in eval mode."""
        spec = self.model_spec
        model = spec.build()
        state = self.read_tensors(WEIGHTS_NAME)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise BundleError(
                f"{WEIGHTS_NAME} does not fit architecture {spec.name!r}: {' '.join(first[:3])}"
            ) from exc
        return model.to(device).eval()


def load_features(
    bundle: Bundle, splits: tuple[str, ...] = FEATURE_SPLITS
) -> dict[str, dict[str, np.ndarray]]:
    """The stored evidence tables of ``splits``."""
    return {split: bundle.read_features(split) for split in splits}


# ------------------------------------------------------------------------ the preprocessing section
@dataclass(frozen=True)
class PreprocessingSection:
    """``preprocessing``: how the data set's images become the model's input, the same offline and
    online. Each image is converted to ``channels`` (PIL ``convert``: grey repeated into RGB, RGB to
    luma) and scaled to ``input_size`` (:func:`models.preprocess.resize_and_crop`), exactly as the
    server decodes an upload; then normalised with ``mean`` / ``std`` (the manifest's
    ``normalisation``). ``data_shape`` is the data set's own ``H, W, C``; ``sources`` says where each
    value came from (a flag, the timm config, the cnn-train statistics, the data)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int]
    channels: int
    data_shape: tuple[int, int, int]
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def converts(self) -> bool:
        """Whether images are converted at all (another size or channel count than the data's)."""
        h, w, c = self.data_shape
        return (h, w) != tuple(self.input_size) or c != self.channels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.channels, int(self.input_size[0]), int(self.input_size[1])

    @property
    def normalisation(self) -> Normalisation:
        return Normalisation(tuple(self.mean), tuple(self.std))

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": list(self.input_size),
            "channels": self.channels,
            "data_shape": list(self.data_shape),
            "sources": dict(self.sources),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PreprocessingSection:
        try:
            return cls(
                mean=tuple(float(v) for v in raw["mean"]),
                std=tuple(float(v) for v in raw["std"]),
                input_size=(int(raw["input_size"][0]), int(raw["input_size"][1])),
                channels=int(raw["channels"]),
                data_shape=tuple(int(v) for v in raw["data_shape"]),  # type: ignore[arg-type]
                sources=dict(raw.get("sources") or {}),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"manifest preprocessing section: missing or malformed {exc}") from exc


# ------------------------------------------------------------------------ the detectors section
DEFAULT_COND_INPUTS = "conductance"  # what bundles made before the option read: the paper's inputs
DEFAULT_OPERATING_POINT = "equal-recall"


@dataclass(frozen=True)
class ConductanceDetectorInfo:
    """``detectors.conductance``: where the conductance detector is stored and what it reads."""

    stem: str = CONDUCTANCE_DETECTOR_STEM
    inputs: str = DEFAULT_COND_INPUTS
    best_val_auroc: float | None = None
    best_epoch: int | None = None
    trained_on: str = "fit"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ConductanceDetectorInfo:
        return cls(**{k: raw[k] for k in _field_names(cls) if k in raw})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class SignalSetInfo:
    """One entry of ``detectors.signal_sets``: a verdict recipe as stored. ``operating_points`` maps
    each point's name to its stored form; ``details`` keeps every other key (``val_auroc_by_kind``,
    ``skipped_points``, ``source``, ...) as written."""

    name: str
    signals: tuple[str, ...]
    stem: str
    operating_points: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_point: str = DEFAULT_OPERATING_POINT
    kind: str | None = None
    val_auroc: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("signals", "stem", "operating_points", "default_point", "kind", "val_auroc")

    @classmethod
    def from_dict(cls, name: str, raw: dict[str, Any]) -> SignalSetInfo:
        known = {k: raw[k] for k in cls._KEYS if k in raw}
        known["signals"] = tuple(raw["signals"])
        known.setdefault("stem", signal_set_stem(name))
        return cls(name=name, **known, details={k: v for k, v in raw.items() if k not in cls._KEYS})

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self._KEYS if getattr(self, k) is not None}
        out["signals"] = list(self.signals)
        return {**out, **self.details}


@dataclass(frozen=True)
class DetectorsSection:
    """The manifest's ``detectors`` section: the conductance detector, the signal sets, the set the
    server uses by default and the detector seeds; ``details`` keeps the other keys (``seconds``,
    the report's ``evidence_value``)."""

    conductance: ConductanceDetectorInfo
    signal_sets: dict[str, SignalSetInfo]
    default_set: str
    seeds: tuple[int, ...] = (0,)
    details: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("conductance", "signal_sets", "default_set", "seeds")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DetectorsSection:
        try:
            return cls(
                conductance=ConductanceDetectorInfo.from_dict(raw.get("conductance") or {}),
                signal_sets={n: SignalSetInfo.from_dict(n, s) for n, s in raw["signal_sets"].items()},
                default_set=str(raw["default_set"]),
                seeds=tuple(int(s) for s in raw.get("seeds") or (0,)),
                details={k: v for k, v in raw.items() if k not in cls._KEYS},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest detectors section: missing or malformed {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "conductance": self.conductance.to_dict(),
            "signal_sets": {name: info.to_dict() for name, info in self.signal_sets.items()},
            "default_set": self.default_set,
            "seeds": list(self.seeds),
            **self.details,
        }

    def signal_set(self, name: str | None) -> SignalSetInfo:
        """The set ``name`` (the default set for None)."""
        name = name or self.default_set
        try:
            return self.signal_sets[name]
        except KeyError:
            raise BundleError(
                f"no signal set {name!r} in the bundle; stored: {sorted(self.signal_sets)}"
            ) from None


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Open a bundle, refusing unknown schemas, missing files and files whose hash changed."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise BundleError(f"bundle directory {path} does not exist")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path} is missing: {path} is not a bundle (or its build never started)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object")
    version = manifest.get("schema_version")
    if version not in SUPPORTED_SCHEMAS:
        raise BundleError(
            f"{manifest_path} has schema_version {version!r}; this predgate "
            f"({__version__}) reads {sorted(SUPPORTED_SCHEMAS)}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise BundleError(f"{manifest_path} lacks required keys {missing}")
    if verify:
        for name, info in manifest["files"].items():
            file_path = path / name
            if not file_path.is_file():
                raise BundleError(f"bundle file {name} is missing from {path}")
            actual = sha256_file(file_path)
            if actual != info.get("sha256"):
                raise BundleError(
                    f"bundle file {name} does not match its manifest hash "
                    f"(expected {info.get('sha256')}, found {actual}): it was changed after the build"
                )
    return Bundle(path, manifest)

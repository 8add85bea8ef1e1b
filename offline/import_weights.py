"""Read the weights of a model trained elsewhere (``--weights``) and load them into its architecture.

What each format gives (the architecture is always the ``--arch`` one, a Python ``nn.Module``:
conductance needs forward hooks on the layer and the head after it, mutants need the ``nn.Conv2d``
weights, and both need the module in eval mode):

- **safetensors** (``safetensors.torch.save_file(model.state_dict(), ...)``): tensors only, no code.
- **state_dict** (``torch.save(model.state_dict(), ...)``, ``.pt`` / ``.pth``): read with
  ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers. A
  training checkpoint that holds the state_dict under ``state_dict`` / ``model_state_dict`` /
  ``model`` / ``net`` is read from that key; a ``module.`` prefix (``DataParallel``) is dropped.
- **TorchScript** (``torch.jit.save``): its weights are loaded into ``--arch`` and the file's own
  forward must give the same logits on val images. A scripted module cannot be hooked (no
  ``register_forward_hook``, no ``get_submodule``), so it serves as the reference, never as the model.
- **torch.export** programs (``torch.export.save``, ``.pt2``): as TorchScript; the program's state
  (parameters and buffers, by their original names) is loaded into ``--arch``. ``torch.export.load``
  may unpickle constants, so give only programs you made.

Refused, each with a one-line reason and what to save instead: a whole pickled model
(``torch.save(model)``: unpickling runs arbitrary code), ONNX files, and anything else. The server
never reads these files: the bundle stores the loaded weights as safetensors.
"""

from __future__ import annotations

import re
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from models.architectures import first_conv
from models.errors import ConfigError

SUPPORTED = (
    "safetensors, a state_dict saved with torch.save(model.state_dict(), ...), a TorchScript file "
    "(torch.jit.save) or a torch.export program (torch.export.save)"
)
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
REFERENCE_RTOL = 1e-4


@dataclass
class ImportedWeights:
    """Tensors by parameter / buffer name, the format they came in, and for TorchScript and
    torch.export files the file's own forward (``reference``) and the class it was made from."""

    state: dict[str, torch.Tensor]
    format: str
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None
    original_class: str | None = None

    def describe(self) -> dict[str, str]:
        out = {"format": self.format}
        if self.original_class:
            out["original_class"] = self.original_class
        return out


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except zipfile.BadZipFile:
        return []


def _is_safetensors(path: Path, head: bytes) -> bool:
    if path.suffix == ".safetensors":
        return True
    if len(head) < 9:
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return 0 < size < path.stat().st_size and head[8:9] == b"{"


def detect_format(path: Path) -> str:
    """``safetensors``, ``torchscript``, ``torch.export``, ``torch.save``, ``onnx`` or ``unknown``."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if path.suffix == ".onnx":
        return "onnx"
    if _is_safetensors(path, head):
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        names = _zip_names(path)
        if any(n.endswith("archive_format") or "/models/" in n and n.endswith(".json") for n in names):
            return "torch.export"
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch.save"
        return "unknown"
    if head[:1] == b"\x80":  # a pickle protocol byte: torch.save's legacy (non-zip) format
        return "torch.save"
    if b"onnx" in head.lower() or b"pytorch" in head.lower():
        return "onnx"
    return "unknown"


def _only_tensors(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _from_torch_save(path: Path) -> ImportedWeights:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError (or RuntimeError) for anything not plain
        text = str(exc)
        if "Weights only load failed" not in text and "weights_only" not in text:
            raise ConfigError(
                f"--weights {path.name}: cannot read it as a torch.save file: {text.splitlines()[0]}"
            ) from exc
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        raise ConfigError(
            f"--weights {path.name} holds a pickled Python object{what}, not a state_dict: predgate loads "
            "weights with weights_only=True (unpickling can run any code). Save them with "
            "torch.save(model.state_dict(), 'weights.pt') or safetensors.torch.save_file(model.state_dict(), "
            "'weights.safetensors') and name the class with --arch package.module:Class"
        ) from None
    if _only_tensors(obj):
        return ImportedWeights(dict(obj), "state_dict")  # type: ignore[arg-type]
    if isinstance(obj, dict):
        for key in CHECKPOINT_KEYS:
            if _only_tensors(obj.get(key)):
                return ImportedWeights(dict(obj[key]), f"checkpoint[{key!r}]")
        keys = sorted(map(str, obj))[:8]
        raise ConfigError(
            f"--weights {path.name} is a dict without a state_dict (keys {keys}); save model.state_dict() "
            f"itself, or put it under one of {list(CHECKPOINT_KEYS)}"
        )
    raise ConfigError(
        f"--weights {path.name} holds a {type(obj).__name__}, not a state_dict; give {SUPPORTED}"
    )


def _from_torchscript(path: Path) -> ImportedWeights:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the format many ship
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise ConfigError(
                f"--weights {path.name}: not a readable TorchScript file: {str(exc).splitlines()[0]}"
            ) from exc
    scripted.eval()
    state = {k: v.detach().clone() for k, v in scripted.state_dict().items()}
    return ImportedWeights(state, "torchscript", scripted, getattr(scripted, "original_name", None))


def _from_export(path: Path) -> ImportedWeights:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch.export raises many kinds on a bad archive
        raise ConfigError(
            f"--weights {path.name}: not a readable torch.export program: {str(exc).splitlines()[0]}"
        ) from exc
    state = {k: v.detach().clone() for k, v in program.state_dict.items()}
    for name, value in program.constants.items():  # non-persistent buffers
        if isinstance(value, torch.Tensor):
            state.setdefault(name, value.detach().clone())
    return ImportedWeights(state, "torch.export", program.module())


def read_weights(path: str | Path) -> ImportedWeights:
    """The tensors of ``path`` in any supported format (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--weights {path}: no such file")
    kind = detect_format(path)
    if kind == "safetensors":
        try:
            return ImportedWeights(load_safetensors(str(path)), "safetensors")
        except Exception as exc:  # safetensors raises its own error types
            raise ConfigError(f"--weights {path.name}: not a readable safetensors file: {exc}") from exc
    if kind == "torch.save":
        return _from_torch_save(path)
    if kind == "torchscript":
        return _from_torchscript(path)
    if kind == "torch.export":
        return _from_export(path)
    if kind == "onnx":
        raise ConfigError(
            f"--weights {path.name}: ONNX files are not read (conductance and mutants need the PyTorch "
            f"module); give {SUPPORTED}"
        )
    raise ConfigError(f"--weights {path.name}: unknown format; give {SUPPORTED}")


def _strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    if not set(state) & expected and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def load_into(model: nn.Module, imported: ImportedWeights, arch: str, file: str) -> None:
    """Load ``imported`` into ``model`` (strict), or raise one line that says what does not fit and
    how to fix it: the input channels, the number of classes, or the architecture itself."""
    expected = model.state_dict()
    state = _strip_prefix(imported.state, set(expected))
    conv = first_conv(model)
    if conv is not None and f"{conv[0]}.weight" in state:
        name, module = conv
        have = state[f"{name}.weight"]
        if have.ndim == 4 and have.shape[1] * module.groups != module.in_channels:
            channels = have.shape[1] * module.groups
            raise ConfigError(
                f"--weights {file}: the first convolution {name!r} was trained on {channels}-channel images, "
                f"the model is built for {module.in_channels}: pass --channels {channels} (images converted "
                "as the server converts uploads: grey repeated into RGB, RGB to luma)"
            )
    head = _last_linear(model)
    if head is not None and f"{head[0]}.weight" in state:
        name, module = head
        have = state[f"{name}.weight"]
        if have.ndim == 2 and have.shape[0] != module.out_features:
            raise ConfigError(
                f"--weights {file}: the head {name!r} gives {have.shape[0]} classes, the data set has "
                f"{module.out_features}: these weights were trained for another label set"
            )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing from the file (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} not in the model (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[0]})")
        made_from = (
            f"; the file was made from class {imported.original_class}" if imported.original_class else ""
        )
        raise ConfigError(
            f"--weights {file} does not fit --arch {arch}: {', '.join(parts)}{made_from}; name the "
            "architecture (and its --arch-kwargs) the weights were saved from"
        )
    model.load_state_dict(state, strict=True)


def check_reference(
    model: nn.Module, imported: ImportedWeights, x: torch.Tensor, arch: str, file: str
) -> float | None:
    """For a TorchScript / torch.export file: the largest difference between its own forward and the
    rebuilt ``--arch`` on ``x`` (relative to the logits' scale); refuses a model that differs."""
    if imported.reference is None:
        return None
    model.eval()
    with torch.no_grad():
        ours = model(x)
        try:
            theirs = imported.reference(x)
        except Exception as exc:  # a scripted or exported forward fails in many ways
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(
                f"--weights {file}: its own forward fails on a batch of {tuple(x.shape)}: {first} (export it "
                "with a dynamic batch dimension, e.g. dynamic_shapes={'x': {0: torch.export.Dim('n')}})"
            ) from exc
    if not isinstance(theirs, torch.Tensor) or theirs.shape != ours.shape:
        got = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
        raise ConfigError(
            f"--weights {file}: its own forward gives {got}, --arch {arch} gives {tuple(ours.shape)}"
        )
    scale = float(theirs.abs().max().clamp_min(1e-12))
    rel = float((ours - theirs).abs().max()) / scale
    if rel > REFERENCE_RTOL:
        made_from = f" (made from class {imported.original_class})" if imported.original_class else ""
        raise ConfigError(
            f"--weights {file}{made_from}: with its weights, --arch {arch} gives logits {rel:.2g} (relative) "
            "away from the file's own forward: --arch is not the architecture the file was made from"
        )
    return rel

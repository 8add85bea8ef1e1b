"""CNN architectures the gate can sit in front of, and the layer whose conductance it reads.

ResNet20 is the CIFAR ResNet of He et al. (2016, section 4.2) used by the paper. Any other model is
named by a :class:`ModelSpec` (recorded in the bundle manifest, so the server rebuilds the same
module): a torchvision classification model by name, a timm model as ``timm:NAME``, or a class (or
factory function) of one's own as an import path ``package.module:Class`` found on ``code_path`` or
in the installed environment, with keyword arguments as JSON.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.errors import BundleError, ConfigError

log = logging.getLogger("predgate.architectures")


def check_eval(model: nn.Module, what: str) -> None:
    """Refuse a model with modules in training mode: ``what`` (conductance, mutants, the ONNX export)
    needs BatchNorm's running statistics and no dropout, which only eval mode gives (batched tricks
    such as vmap would silently use batch statistics instead)."""
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ConfigError(
            f"{what} needs the model in eval mode; call model.eval() (modules in training mode: "
            f"{training[:5]})"
        )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1-projection shortcut (He et al. option B)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20: 3 stages of 3 basic blocks (16/32/64 channels), GAP, linear head.

    ``layer3`` (the output of the last block, after its ReLU) is the conductance layer: only
    pooling and the linear head follow it, which is what makes the exact shortcut possible.
    Works for any input size >= 8 pixels and any number of input channels (1 for Fashion-MNIST).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._stage(16, 16, stride=1)
        self.layer2 = self._stage(16, 32, stride=2)
        self.layer3 = self._stage(32, 64, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int, blocks: int = 3) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


# Default conductance layer per architecture: the last convolutional feature maps.
DEFAULT_LAYERS: dict[str, str] = {
    "resnet20": "layer3",
    "resnet18": "layer4",
    "resnet34": "layer4",
    "resnet50": "layer4",
    "resnet101": "layer4",
    "inception_v3": "Mixed_7c",
    "mobilenet_v3_small": "features",
    "mobilenet_v3_large": "features",
    "mobilenet_v2": "features",
    "efficientnet_b0": "features",
    "vgg16": "features",
    "densenet121": "features",
}


def _torchvision_builder(arch: str) -> Callable[..., nn.Module]:
    import torchvision.models as tvm

    try:
        return tvm.get_model_builder(arch)
    except ValueError as exc:
        close = difflib.get_close_matches(arch, tvm.list_models(), n=3)
        raise BundleError(
            f"unknown architecture {arch!r}: not resnet20, a torchvision "
            f"model{f' (closest: {close})' if close else ''}, timm:NAME (a timm model) nor "
            "package.module:Class (a class of your own, with --code-path)"
        ) from exc


def _set_input_channels(model: nn.Module, in_channels: int) -> None:
    """Replace the first convolution so that grey-scale (or other) inputs need no channel copying."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                module.bias is not None,
            )
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            return


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    kwargs: dict[str, Any] | None = None,
    code_path: str | None = None,
) -> nn.Module:
    """Build an untrained model; weights come from training or a state-dict file. ``arch`` is
    resnet20, a torchvision name, ``timm:NAME`` or ``package.module:Class`` (see :class:`ModelSpec`)."""
    return ModelSpec(arch, num_classes, in_channels, dict(kwargs or {}), code_path).build()


def _build_table_model(arch: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    if arch == "resnet20":
        return ResNet20(num_classes=num_classes, in_channels=in_channels, **kwargs)
    builder = _torchvision_builder(arch)
    options: dict[str, object] = {"weights": None, "num_classes": num_classes}
    if arch == "inception_v3":
        options.update(aux_logits=False, init_weights=True)
    model = builder(**{**options, **kwargs})
    if in_channels != 3:
        _set_input_channels(model, in_channels)
    return model


def default_layer(arch: str) -> str:
    """Name of the module whose output is the conductance layer for ``arch``."""
    try:
        return DEFAULT_LAYERS[arch]
    except KeyError as exc:
        raise BundleError(
            f"no default conductance layer for {arch!r}; name one of its modules explicitly"
        ) from exc


def closest_module_names(model: nn.Module, name: str, n: int = 6) -> list[str]:
    """The module names of ``model`` nearest to ``name`` (spelling first, then shared prefixes)."""
    names = [m for m, _ in model.named_modules() if m]
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    head = name.split(".")[0]
    close += [m for m in names if m not in close and (m.startswith(head) or head in m)]
    return (close or [m for m in names if "." not in m])[:n]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """Module called ``name`` in ``model``, with an error that names the closest valid names."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        count = sum(1 for m, _ in model.named_modules() if m)
        raise BundleError(
            f"model has no module {name!r}; closest names: {closest_module_names(model, name)} "
            f"(of {count}; the conductance layer is the name of a module whose output is a feature map)"
        ) from exc


# ------------------------------------------------------------------------------ models from anywhere
TIMM_PREFIX = "timm:"
CODE_PATH_ENV = "PREDGATE_CODE_PATH"
"""Where to look for an imported architecture's code when the folder recorded in a bundle is absent."""


def arch_source(arch: str) -> str:
    """Where ``arch`` comes from: ``builtin`` (resnet20), ``timm``, ``import`` or ``torchvision``."""
    if arch == "resnet20":
        return "builtin"
    if arch.startswith(TIMM_PREFIX):
        return "timm"
    if ":" in arch:
        return "import"
    return "torchvision"


@dataclass(frozen=True)
class ModelSpec:
    """An architecture as the manifest records it (``architecture``): enough to rebuild the module.

    Parameters
    ----------
    name : ``resnet20``, a torchvision model name, ``timm:NAME`` (timm's ``create_model`` with
        ``pretrained=False``: no download, weights come from the user) or ``package.module:Class``
        (a class or factory function; ``path/to/file.py:Class`` is read as module ``file`` on the
        file's folder).
    num_classes, in_channels : passed to built-in, torchvision and timm builders; passed to an
        imported class only when its signature takes ``num_classes`` / ``in_channels`` /
        ``in_chans`` and ``kwargs`` does not set them (what was passed is recorded in ``kwargs``).
    kwargs : extra keyword arguments (``--arch-kwargs``), JSON values.
    code_path : a folder put on ``sys.path`` before importing (``--code-path``).
    code_sha256 : sha256 of the imported module's file when the bundle was built; a different file at
        load time is logged as a warning (the weights may no longer mean the same thing).
    """

    name: str
    num_classes: int
    in_channels: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    code_path: str | None = None
    code_sha256: str | None = None

    @property
    def source(self) -> str:
        return arch_source(self.name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "source": self.source,
        }
        if self.kwargs:
            out["kwargs"] = dict(self.kwargs)
        if self.code_path is not None:
            out["code_path"] = self.code_path
        if self.code_sha256 is not None:
            out["code_sha256"] = self.code_sha256
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSpec:
        try:
            return cls(
                name=str(raw["name"]),
                num_classes=int(raw["num_classes"]),
                in_channels=int(raw["in_channels"]),
                kwargs=dict(raw.get("kwargs") or {}),
                code_path=raw.get("code_path"),
                code_sha256=raw.get("code_sha256"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest architecture section: missing or malformed {exc}") from exc

    def build(self) -> nn.Module:
        """A fresh, untrained module (in training mode, as constructors leave it)."""
        try:
            json.dumps(self.kwargs)
        except TypeError as exc:
            raise ConfigError(f"--arch-kwargs must be JSON values: {exc}") from exc
        source = self.source
        if source == "timm":
            return _build_timm(self.name[len(TIMM_PREFIX) :], self.num_classes, self.in_channels, self.kwargs)
        if source == "import":
            factory, file = import_factory(self.name, self._code_path_here())
            if self.code_sha256 is not None and file is not None and _file_sha256(file) != self.code_sha256:
                log.warning(
                    (
                        "%s has changed since the bundle was built (sha256 "
                        "differs): the weights may not mean the same"
                    ),
                    file,
                )
            return _call_factory(factory, self.name, self.kwargs)
        return _build_table_model(self.name, self.num_classes, self.in_channels, self.kwargs)

    def _code_path_here(self) -> str | None:
        """The folder to import the model code from on this machine: the one recorded at build time, or,
        once the bundle has moved where that folder does not exist, the first folder of
        ``PREDGATE_CODE_PATH`` (``os.pathsep``-separated) that holds the module. The recorded sha256 still
        tells whether the code found is the code the weights were trained with."""
        recorded = self.code_path
        if recorded is None or Path(recorded).is_dir():
            return recorded
        module = self.name.rpartition(":")[0]
        relative = Path(*module.split(".")).with_suffix(".py")
        for folder in os.environ.get(CODE_PATH_ENV, "").split(os.pathsep):
            if folder and (
                (Path(folder) / relative).is_file() or (Path(folder) / relative.with_suffix("")).is_dir()
            ):
                return folder
        raise ConfigError(
            f"the bundle's model code ({self.name}) was recorded at {recorded}, which does not exist here: "
            f"copy that folder to this machine and set {CODE_PATH_ENV} to it (or recreate it at the same "
            "path)"
        )

    def resolved(self) -> ModelSpec:
        """This spec with what an import needs to be rebuilt elsewhere: the absolute code path, the
        module file's hash, and the class's ``num_classes`` / ``in_channels`` arguments made explicit."""
        if self.source != "import":
            return self
        factory, file = import_factory(self.name, self.code_path)
        code_path = self.code_path
        module_name, _, _ = self.name.rpartition(":")
        if module_name.endswith(".py"):
            code_path = str(Path(module_name).resolve().parent)
        elif code_path is not None:
            code_path = str(Path(code_path).resolve())
        kwargs = dict(self.kwargs)
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        if "num_classes" in params and "num_classes" not in kwargs:
            kwargs["num_classes"] = self.num_classes
        for key in ("in_channels", "in_chans"):
            if key in params and not {"in_channels", "in_chans"} & set(kwargs):
                kwargs[key] = self.in_channels
        sha = _file_sha256(file) if file is not None else None
        return ModelSpec(self.name, self.num_classes, self.in_channels, kwargs, code_path, sha)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def import_factory(arch: str, code_path: str | None = None) -> tuple[Callable[..., Any], Path | None]:
    """The class (or function) that ``package.module:Attr`` names, and the module's file."""
    module_name, _, attr = arch.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"--arch {arch!r}: an import path is package.module:Class")
    folder = code_path
    if module_name.endswith(".py"):  # path/to/file.py:Class
        file = Path(module_name)
        if not file.is_file():
            raise ConfigError(f"--arch {arch!r}: no file {file}")
        folder, module_name = str(file.resolve().parent), file.stem
    if folder is not None:
        if not Path(folder).is_dir():
            raise ConfigError(f"--code-path {folder}: no such folder")
        resolved = str(Path(folder).resolve())
        if resolved not in sys.path:
            sys.path.insert(0, resolved)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        where = (
            f"on --code-path {folder}" if folder else "in the environment (add its folder with --code-path)"
        )
        raise ConfigError(f"--arch {arch!r}: cannot import module {module_name!r} {where}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            close = difflib.get_close_matches(part, public, n=5, cutoff=0.4) or public[:8]
            raise ConfigError(
                f"--arch {arch!r}: module {module_name!r} has no {attr!r}; closest names: {close}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"--arch {arch!r}: {attr} is a {type(obj).__name__}, not a class or function")
    file = getattr(module, "__file__", None)
    return obj, Path(file) if file else None


def _call_factory(factory: Callable[..., Any], arch: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"--arch {arch}: calling it with {json.dumps(kwargs)} failed ({exc}); give its arguments with "
            "--arch-kwargs JSON"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--arch {arch}: returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _build_timm(name: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm  # heavy optional dependency: only bundles with a timm model need it
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise ConfigError("timm models need the timm package: pip install timm") from exc
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        raise ConfigError(f"--arch timm:{name}: timm has no model {name!r}; closest: {close}")
    options = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels, **kwargs}
    if options.get("pretrained"):
        raise ConfigError(
            "timm models are built with pretrained=False (no download): give the weights with --weights"
        )
    try:
        return timm.create_model(name, **options)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise ConfigError(f"--arch timm:{name} with {json.dumps(kwargs)}: {exc}") from exc


def timm_preprocessing(model: nn.Module) -> dict[str, Any]:
    """What a timm model's config says its weights expect: ``mean``, ``std``, ``input_size`` (C, H, W);
    empty for other models."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return {k: cfg[k] for k in ("mean", "std", "input_size") if cfg.get(k) is not None}


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first ``nn.Conv2d`` in ``named_modules()`` order (the one that reads the image)."""
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def check_input_channels(model: nn.Module, channels: int, arch: str) -> None:
    """Refuse a model whose first convolution reads another number of channels than the images have."""
    found = first_conv(model)
    if found is not None and found[1].in_channels != channels:
        name, conv = found
        raise ConfigError(
            f"--arch {arch}: its first convolution {name!r} reads {conv.in_channels} channels, the images "
            f"have {channels}: pass --channels {conv.in_channels} (images converted as the server converts "
            f"uploads: grey repeated into RGB, RGB to luma) or build the model for {channels} channels "
            "(--arch-kwargs)"
        )


def check_forward(model: nn.Module, input_shape: tuple[int, int, int], num_classes: int, arch: str) -> None:
    """One forward pass on two zero images: the model must take ``C x H x W`` and give ``num_classes``
    logits."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as exc:  # any failure of a user's forward, reported in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"--arch {arch} fails on a batch of {'x'.join(map(str, input_shape))} images: {first}; set the "
            "input size (--input-size) and channels (--channels) the model was made for"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"--arch {arch} gives {got} for 2 images, not (2, {num_classes}) logits for the data set's "
            f"{num_classes} classes; build its head for {num_classes} classes (--arch-kwargs, e.g. "
            f"'{{\"num_classes\": {num_classes}}}') and return plain logits"
        )


_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


def pick_layer(model: nn.Module, arch: str, input_shape: tuple[int, int, int]) -> tuple[str, str]:
    """The default conductance layer and how it was chosen: the architecture table, timm's last
    feature stage, or else the last module whose output is a feature map (``N x C x h x w``, not a
    pooling layer) in one forward pass."""
    if arch in DEFAULT_LAYERS:
        return DEFAULT_LAYERS[arch], "the architecture's last stage"
    info = getattr(model, "feature_info", None)
    if arch_source(arch) == "timm" and info:
        last = info[-1] if isinstance(info, list) else None
        if isinstance(last, dict) and last.get("module"):
            try:
                model.get_submodule(last["module"])
                return str(last["module"]), "timm's last feature stage"
            except AttributeError:
                pass
    order: list[str] = []
    names = {m: n for n, m in model.named_modules() if n}

    def hook(module: nn.Module, _inputs: object, output: object) -> None:
        name = names.get(module)
        pooling = isinstance(module, _POOLS) or "Pool" in type(module).__name__
        if name and isinstance(output, torch.Tensor) and output.ndim == 4 and not pooling:
            order.append(name)

    handles = [m.register_forward_hook(hook) for m in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not order:
        raise ConfigError(
            f"--arch {arch}: no module gives a feature map (N x C x h x w); name the layer with --layer"
        )
    return order[-1], "the last module that gives a feature map"

"""CNN architectures the gate can sit in front of, and the layer whose conductance it reads.

ResNet20 is the CIFAR ResNet of He et al. (2016, section 4.2) used by the paper; any torchvision
classification model can be used by name so that bring-your-own weights work without new code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.errors import BundleError, ConfigError


def check_eval(model: nn.Module, what: str) -> None:
    """Refuse a model with modules in training mode: ``what`` (conductance, mutants, the ONNX export)
    needs BatchNorm's running statistics and no dropout, which only eval mode gives (batched tricks
    such as vmap would silently use batch statistics instead)."""
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ConfigError(
            f"{what} needs the model in eval mode; call model.eval() (modules in training mode: {training[:5]})"
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
        raise BundleError(f"unknown architecture {arch!r}: not resnet20 nor a torchvision model") from exc


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


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build an untrained model; weights come from training or a state-dict file."""
    if arch == "resnet20":
        return ResNet20(num_classes=num_classes, in_channels=in_channels)
    builder = _torchvision_builder(arch)
    kwargs: dict[str, object] = {"weights": None, "num_classes": num_classes}
    if arch == "inception_v3":
        kwargs.update(aux_logits=False, init_weights=True)
    model = builder(**kwargs)
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


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """Module called ``name`` in ``model``, with an error that lists nearby valid names."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        names = [n for n, _ in model.named_modules() if n][:40]
        raise BundleError(f"model has no module {name!r}; some valid names: {names}") from exc

"""Architectures: ResNet20 shapes and size (He et al.: ~0.27 M parameters), torchvision by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from models.architectures import (
    DEFAULT_LAYERS,
    ResNet20,
    build_model,
    check_eval,
    default_layer,
    resolve_layer,
)
from models.errors import BundleError, ConfigError


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_cifar_parameter_count() -> None:
    # He et al. (2016) table 6: 0.27 M. Conv+BN+fc with projection shortcuts counted exactly:
    model = ResNet20(10, 3)
    assert 0.26e6 < _params(model) < 0.28e6
    assert sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d)) == 21


@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28)])
def test_resnet20_shapes(channels: int, size: int) -> None:
    model = build_model("resnet20", 10, channels).eval()
    features = {}
    resolve_layer(model, default_layer("resnet20")).register_forward_hook(
        lambda _m, _i, out: features.setdefault("a", out)
    )
    with torch.no_grad():
        logits = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 10)
    assert features["a"].shape == (2, 64, (size + 3) // 4, (size + 3) // 4)


def test_torchvision_model_by_name_with_grey_input() -> None:
    model = build_model("resnet18", 7, 1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 7)
    assert default_layer("resnet18") == "layer4"
    assert default_layer("inception_v3") == "Mixed_7c"
    assert set(DEFAULT_LAYERS) >= {"resnet20", "resnet50", "mobilenet_v3_small"}


def test_unknown_names_are_refused() -> None:
    with pytest.raises(BundleError, match="unknown architecture"):
        build_model("no_such_net", 10)
    with pytest.raises(BundleError, match="no default conductance layer"):
        default_layer("no_such_net")
    with pytest.raises(BundleError, match="has no module 'layer9'"):
        resolve_layer(ResNet20(), "layer9")


def test_check_eval_names_the_modules_in_training_mode() -> None:
    model = build_model("resnet20", num_classes=10, in_channels=1)
    with pytest.raises(ConfigError, match=r"the ONNX export needs the model in eval mode.*'conv1'"):
        check_eval(model, "the ONNX export")
    check_eval(model.eval(), "the ONNX export")


def test_a_moved_bundle_finds_its_model_code_through_predgate_code_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle built with --code-path records that folder; on another machine it is usually elsewhere."""
    import hashlib
    import shutil

    from models.architectures import CODE_PATH_ENV, ModelSpec

    source = Path(__file__).resolve().parents[2] / "examples" / "byom"
    moved = tmp_path / "moved"
    shutil.copytree(source, moved)
    sha = hashlib.sha256((source / "mynets.py").read_bytes()).hexdigest()
    spec = ModelSpec(
        "mynets:SmallVGG",
        10,
        1,
        {"width": 8, "num_classes": 10, "in_channels": 1},
        code_path=str(tmp_path / "gone"),
        code_sha256=sha,
    )
    monkeypatch.delenv(CODE_PATH_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'gone'}.*{CODE_PATH_ENV}"):
        spec.build()
    monkeypatch.setenv(CODE_PATH_ENV, os.pathsep.join([str(tmp_path / "empty"), str(moved)]))
    model = spec.build()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert spec._code_path_here() == str(moved)  # the first folder that holds the module

"""Bring your own model: tiny bundles built from a class of one's own (an import path to this very
file), a timm model, a TorchScript file and a 3-channel state_dict on 1-channel data, a model with
its own normalisation, and a degenerate model that the build stops."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from cli.main import main
from models.bundle import MANIFEST_NAME, Bundle, load_bundle
from models.data import load_splits
from models.gate import load_gate
from models.image_input import InputContract, decode_image

ROOT = Path(__file__).resolve().parents[2]
OWN = "tests.offline.test_byom:SmallNet"
SIZES = ["--cnn-train", "300", "--fit", "150", "--val", "120", "--test", "120"]
MICRO = [
    *SIZES,
    "--epochs",
    "10",
    "--batch-size",
    "32",
    "--n-mutants",
    "4",
    "--detector-seeds",
    "1",
    "--device",
    "cpu",
]


class SmallNet(nn.Module):
    """A VGG-style classifier of one's own: two conv blocks, pooling to 4 x 4, a linear head."""

    def __init__(self, width: int = 8, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class ConstantNet(nn.Module):
    """A degenerate model: the same logits for every image (chance accuracy)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)) * 0.0)


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def _data(data_dir: Path) -> list[str]:
    return ["--dataset", "fashion-mnist", "--data-root", str(data_dir)]


def _own(**kwargs: object) -> list[str]:
    return ["--arch", OWN, "--code-path", str(ROOT), "--arch-kwargs", json.dumps({"width": 8, **kwargs})]


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> dict[str, Path]:
    """SmallNet trained by ``predgate train`` for 3-channel inputs in [0, 1] (its own normalisation,
    not predgate's), saved the ways a user would: state_dict, TorchScript, torch.export, whole pickle."""
    folder = tmp_path_factory.mktemp("rgb-model")
    out = folder / "trained"
    code = main(
        [
            "train",
            *_data(tiny_data_dir),
            *_own(in_channels=3),
            "--channels",
            "3",
            "--mean",
            "0",
            "--std",
            "1",
            *MICRO,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    bundle = load_bundle(out)
    model = bundle.load_model()
    files = {
        "bundle": out,
        "state_dict": folder / "weights.pt",
        "torchscript": folder / "model.ts",
        "export": folder / "model.pt2",
        "pickled": folder / "whole.pt",
        "onnx": folder / "model.onnx",
    }
    torch.save(model.state_dict(), files["state_dict"])
    torch.save(model, files["pickled"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model), files["torchscript"])
    example = torch.zeros(2, 3, 28, 28)
    dynamic = {"x": {0: torch.export.Dim("n")}}
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=dynamic), files["export"])
    files["onnx"].write_bytes(b"\x08\x07\x12\x07pytorch")
    return files


def test_import_path_class_with_training_flags(capsys, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "own"
    code, err = _run(
        capsys,
        "build",
        *_data(tiny_data_dir),
        *_own(),
        *MICRO,
        "--optimizer",
        "adam",
        "--lr",
        "0.01",
        "--weight-decay",
        "0",
        "--augment",
        "on",
        "--n-boot",
        "20",
        "--out",
        str(out),
    )
    assert code == 0, err
    bundle = load_bundle(out)
    arch = bundle.manifest["architecture"]
    assert arch["source"] == "import" and arch["name"] == OWN
    assert arch["kwargs"] == {
        "width": 8,
        "num_classes": 10,
        "in_channels": 1,
    }  # what was passed, made explicit
    assert arch["code_path"] == str(ROOT) and len(arch["code_sha256"]) == 64
    config = bundle.manifest["training"]["config"]
    assert (config["optimizer"], config["max_lr"], config["weight_decay"], config["batch_size"]) == (
        "adam",
        0.01,
        0.0,
        32,
    )
    assert config["flip"] is True and config["crop_padding"] == 4
    profile = bundle.manifest["profile"]
    assert (profile["optimizer"], profile["lr"], profile["augment"]) == ("adam", 0.01, True)
    assert (
        bundle.manifest["conductance"]["layer"] == "features"
    )  # the last feature map, found by a forward pass
    assert bundle.manifest["training"]["accuracy_check"]["verdict"] in ("ok", "warn")
    gate = load_gate(bundle)  # the server's path: the class is imported again from the manifest
    assert isinstance(gate.extractor.model, SmallNet)
    assert (out / "report" / "report.md").is_file()


def test_timm_model_by_name(capsys, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "timm"
    code, err = _run(
        capsys,
        "build",
        *_data(tiny_data_dir),
        "--arch",
        "timm:test_resnet",
        *MICRO,
        "--n-boot",
        "20",
        "--out",
        str(out),
    )
    assert code == 0, err
    bundle = load_bundle(out)
    assert bundle.manifest["architecture"]["source"] == "timm"
    assert bundle.manifest["conductance"]["layer"] == "layer4"
    assert bundle.manifest["conductance"]["layer_chosen_by"] == "timm's last feature stage"
    assert bundle.manifest["mutants"]["count"] == 4
    load_gate(bundle)


def test_timm_weights_take_the_timm_config(capsys, tiny_data_dir: Path, tmp_path: Path) -> None:
    import timm

    weights = tmp_path / "timm.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), str(weights))
    out = tmp_path / "timm-imported"
    code, err = _run(
        capsys,
        "train",
        *_data(tiny_data_dir),
        "--arch",
        "timm:test_resnet",
        "--weights",
        str(weights),
        "--input-size",
        "32",
        *SIZES,
        "--out",
        str(out),
    )
    assert code == 0, err
    pre = load_bundle(out).manifest["preprocessing"]
    assert pre["mean"] == [0.5, 0.5, 0.5] and pre["std"] == [0.5, 0.5, 0.5] and pre["channels"] == 3
    assert pre["sources"]["mean"] == "the timm config" and pre["sources"]["input_size"] == "--input-size"
    assert load_bundle(out).input_shape == (3, 32, 32)


def test_torchscript_file(capsys, rgb_model: dict[str, Path], tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ts"
    code, err = _run(
        capsys,
        "build",
        *_data(tiny_data_dir),
        *_own(in_channels=3),
        "--weights",
        str(rgb_model["torchscript"]),
        "--channels",
        "3",
        "--mean",
        "0",
        "--std",
        "1",
        *MICRO,
        "--n-boot",
        "20",
        "--out",
        str(out),
    )
    assert code == 0, err
    bundle = load_bundle(out)
    imported = bundle.manifest["training"]["imported_from"]
    assert imported["format"] == "torchscript" and imported["original_class"] == "SmallNet"
    assert imported["reference_max_rel_diff"] < 1e-5
    source = load_bundle(rgb_model["bundle"]).manifest["training"]
    assert bundle.manifest["training"]["val_accuracy"] == source["val_accuracy"]
    # TorchScript cannot be hooked: its weights must go into a Python class that fits them
    code, err = _run(
        capsys,
        "train",
        *_data(tiny_data_dir),
        "--weights",
        str(rgb_model["torchscript"]),
        "--channels",
        "3",
        *SIZES,
        "--out",
        str(tmp_path / "wrong-arch"),
    )
    assert code == 2 and "does not fit --arch resnet20" in err and "made from class SmallNet" in err


def test_torch_export_program(
    capsys, rgb_model: dict[str, Path], tiny_data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    code, err = _run(
        capsys,
        "train",
        *_data(tiny_data_dir),
        *_own(in_channels=3),
        "--weights",
        str(rgb_model["export"]),
        "--channels",
        "3",
        "--mean",
        "0",
        "--std",
        "1",
        *SIZES,
        "--out",
        str(out),
    )
    assert code == 0, err
    training = load_bundle(out).manifest["training"]
    assert training["imported_from"]["format"] == "torch.export"
    assert training["val_accuracy"] == load_bundle(rgb_model["bundle"]).manifest["training"]["val_accuracy"]


def test_three_channel_state_dict_on_grey_data(
    capsys, rgb_model: dict[str, Path], tiny_data_dir: Path, tmp_path: Path
) -> None:
    """The stock case: RGB weights, grey data. One line says what to do; doing it builds the bundle."""
    out = tmp_path / "rgb-on-grey"
    common = [
        *_data(tiny_data_dir),
        *_own(),
        "--weights",
        str(rgb_model["state_dict"]),
        "--mean",
        "0",
        "--std",
        "1",
    ]
    code, err = _run(capsys, "build", *common, *MICRO, "--out", str(out))
    assert code == 2
    line = err.strip()
    assert (
        "\n" not in line and "'features.0' was trained on 3-channel images" in line and "--channels 3" in line
    )
    assert not (out / MANIFEST_NAME).exists()  # refused before any bundle file was written
    code, err = _run(capsys, "build", *common, "--channels", "3", *MICRO, "--n-boot", "20", "--out", str(out))
    assert code == 0, err
    bundle = load_bundle(out)
    assert bundle.input_shape == (3, 28, 28)
    assert bundle.manifest["preprocessing"]["sources"]["channels"] == "--channels"
    assert bundle.manifest["training"]["imported_from"]["format"] == "state_dict"
    # the same conversion offline and online: a grey upload decodes to the pixels the build used
    grey = load_splits(load_bundle(rgb_model["bundle"]))["val"].images[:1]
    ours = load_splits(bundle)["val"].images[:1]
    buffer = io.BytesIO()
    raw_val = _raw_val_image(bundle)
    Image.fromarray(raw_val).save(buffer, format="PNG")
    online = decode_image(buffer.getvalue(), InputContract.from_shape(bundle.input_shape))
    np.testing.assert_array_equal(online, ours[0])
    np.testing.assert_array_equal(grey, ours)


def _raw_val_image(bundle: Bundle) -> np.ndarray:
    """The first val image as the data set stores it (28 x 28 grey)."""
    from models.data import DataSource, Splits, apply_splits

    train, test = DataSource(**bundle.manifest["dataset"]["source"]).load()
    splits = Splits.from_dict(bundle.manifest["splits"])
    return apply_splits(train, test, splits)["val"].images[0, :, :, 0]


def test_own_normalisation_is_recorded_and_a_mismatch_is_named(
    capsys, rgb_model: dict[str, Path], tiny_data_dir: Path, tmp_path: Path
) -> None:
    source = load_bundle(rgb_model["bundle"])
    assert source.manifest["preprocessing"]["mean"] == [0.0, 0.0, 0.0]
    assert source.manifest["preprocessing"]["sources"]["mean"] == "--mean"
    assert source.normalisation.mean == (0.0, 0.0, 0.0) and source.normalisation.std == (1.0, 1.0, 1.0)
    out = tmp_path / "no-flags"
    code, err = _run(
        capsys,
        "train",
        *_data(tiny_data_dir),
        *_own(in_channels=3),
        "--channels",
        "3",
        "--weights",
        str(rgb_model["state_dict"]),
        *SIZES,
        "--out",
        str(out),
    )
    assert code == 0, err
    check = load_bundle(out).manifest["training"]["accuracy_check"]
    # predgate's own normalisation ruins the model, and the check names the one it was trained with
    assert check["val_accuracy"] < source.manifest["training"]["val_accuracy"] - 0.15
    assert check["better_normalisation"]["--mean 0 --std 1 (pixels in [0, 1])"] == pytest.approx(
        source.manifest["training"]["val_accuracy"]
    )
    assert "With --mean 0 --std 1 (pixels in [0, 1]) the model gets" in err


def test_degenerate_model_is_stopped_before_the_mutants(capsys, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "constant"
    args = [
        "build",
        *_data(tiny_data_dir),
        "--arch",
        "tests.offline.test_byom:ConstantNet",
        "--code-path",
        str(ROOT),
        *SIZES,
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    for _ in range(2):  # the rerun into the same --out stops the same way (no TypeError, no traceback)
        code, err = _run(capsys, *args)
        assert code == 2
        assert (
            "build stopped before the mutants" in err and "one class" in err and "--allow-low-accuracy" in err
        )
        stages = load_bundle(out).manifest["stages"]
        assert "train" in stages and "mutants" not in stages and "conductance" not in stages


def test_wrong_layer_is_refused_before_training_with_the_closest_names(
    capsys, tiny_data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "layer"
    code, err = _run(
        capsys, "build", *_data(tiny_data_dir), *_own(), "--layer", "featurs", *MICRO, "--out", str(out)
    )
    assert code == 2 and "no module 'featurs'" in err and "'features'" in err
    assert not (out / MANIFEST_NAME).exists()


def test_unfinished_bundle_is_started_afresh(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A failed first attempt that left only a stub manifest: the rerun builds instead of crashing."""
    from models.preprocess import Normalisation

    out = tmp_path / "stub"
    Bundle.create(
        out,
        dataset={"name": "fashion-mnist"},
        class_names=["a"],
        input_shape=(1, 28, 28),
        normalisation=Normalisation((0.5,), (0.5,)),
        architecture={"name": "resnet20"},
    )
    assert (
        main(
            [
                "train",
                *_data(tiny_data_dir),
                *_own(),
                *SIZES,
                "--epochs",
                "1",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert load_bundle(out).stage_done("train")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("pickled", "holds a pickled Python object (tests.offline.test_byom.SmallNet), not a state_dict"),
        ("onnx", "ONNX files are not read"),
    ],
)
def test_unsupported_files_are_refused_in_one_line(
    capsys, rgb_model: dict[str, Path], tiny_data_dir: Path, tmp_path: Path, kind: str, message: str
) -> None:
    code, err = _run(
        capsys,
        "train",
        *_data(tiny_data_dir),
        *_own(in_channels=3),
        "--channels",
        "3",
        "--weights",
        str(rgb_model[kind]),
        *SIZES,
        "--out",
        str(tmp_path / kind),
    )
    assert code == 2 and message in err and err.count("\n") == 1
    if kind == "pickled":
        assert "torch.save(model.state_dict()" in err


def test_exclude_indices_keep_the_cnns_images_out_of_the_detectors_splits(
    capsys, rgb_model: dict[str, Path], tiny_data_dir: Path, tmp_path: Path
) -> None:
    named = np.arange(0, 950, 2)[:400]  # the images "the CNN was trained on"
    index_file = tmp_path / "trained-on.txt"
    index_file.write_text("\n".join(map(str, named)))
    out = tmp_path / "honest"
    code, err = _run(
        capsys,
        "train",
        *_data(tiny_data_dir),
        *_own(in_channels=3),
        "--channels",
        "3",
        "--mean",
        "0",
        "--std",
        "1",
        "--weights",
        str(rgb_model["state_dict"]),
        "--exclude-indices",
        str(index_file),
        *SIZES,
        "--out",
        str(out),
    )
    assert code == 0, err
    bundle = load_bundle(out)
    record = bundle.manifest["splits"]["cnn_train_indices"]
    assert record["count"] == 400 and record["given_as"] == "trained-on.txt"
    from models.data import Splits

    splits = Splits.from_dict(bundle.manifest["splits"], bundle.read_arrays(record["file"])["indices"])
    assert set(splits.indices["cnn-train"]) <= set(named)
    for name in ("fit", "val"):
        assert not set(splits.indices[name]) & set(named)
    load_splits(bundle)  # reloads through the stored file


def test_report_says_imported_weights_may_overlap_without_exclusion() -> None:
    from offline.markdown import fit_source

    manifest = {"splits": {"sizes": {"fit": 150}}, "training": {"imported_weights": "w.pt"}}
    assert "may overlap the CNN's training data" in fit_source(manifest)
    manifest["splits"]["cnn_train_indices"] = {"count": 400, "given_as": "trained-on.txt"}
    assert "never saw" in fit_source(manifest) and "trained-on.txt" in fit_source(manifest)
    assert "never saw" in fit_source({"splits": {"sizes": {"fit": 150}}, "training": {}})

"""Training: it learns, and a run stopped after an epoch and resumed ends where an unbroken run does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.architectures import build_model
from models.attacks import PixelModel, to_pixels
from models.data import ImageArrays
from models.errors import ConfigError
from models.preprocess import Normalisation
from offline.train import TrainConfig, accuracy, train_model


def _toy_data(n: int = 192, seed: int = 0) -> ImageArrays:
    """Class = which quadrant is bright: learnable in a few steps, not solvable by chance."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 60, (n, 12, 12, 1)).astype(np.uint8)
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 2)
        images[i, r * 6 : r * 6 + 6, c * 6 : c * 6 + 6] += 150
    return ImageArrays(images, labels, ["a", "b", "c", "d"])


def _fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20", 4, 1)


def test_training_learns_a_separable_task() -> None:
    data = _toy_data()
    norm = Normalisation.from_images(data.images)
    model = _fresh_model()
    config = TrainConfig(epochs=3, batch_size=32, max_lr=0.05, crop_padding=1)
    result = train_model(model, data, norm, config, val=data, progress=False, device=torch.device("cpu"))
    assert result.epochs_done == 3 and len(result.history) == 3
    assert not model.training
    assert accuracy(model, norm.apply(data.images), torch.from_numpy(data.labels)) > 0.8


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    data = _toy_data(96)
    norm = Normalisation.from_images(data.images)
    config = TrainConfig(epochs=2, batch_size=32, max_lr=0.05, crop_padding=1, flip=True)
    cpu = torch.device("cpu")

    straight = _fresh_model()
    train_model(straight, data, norm, config, progress=False, device=cpu)

    ckpt = tmp_path / "ckpt.pt"
    first = _fresh_model()
    train_model(
        first,
        data,
        norm,
        TrainConfig(**{**config.to_dict(), "epochs": 2}),
        checkpoint=ckpt,
        progress=False,
        device=cpu,
    )
    # Simulate an interruption after epoch 1: rewrite the checkpoint from a 1-epoch prefix run.
    partial = _fresh_model()
    ckpt2 = tmp_path / "ckpt2.pt"
    state_after_two = torch.load(ckpt, weights_only=False)
    assert state_after_two["epochs_done"] == 2

    class Stop(Exception):
        pass

    calls = {"n": 0}
    original_save = torch.save

    def save_then_stop(obj, path):
        original_save(obj, path)
        calls["n"] += 1
        raise Stop

    torch.save = save_then_stop
    try:
        with pytest.raises(Stop):
            train_model(partial, data, norm, config, checkpoint=ckpt2, progress=False, device=cpu)
    finally:
        torch.save = original_save
    assert torch.load(ckpt2.with_suffix(".tmp"), weights_only=False)["epochs_done"] == 1
    ckpt2.with_suffix(".tmp").replace(ckpt2)

    resumed = _fresh_model()
    result = train_model(
        resumed, data, norm, config, checkpoint=ckpt2, resume=True, progress=False, device=cpu
    )
    assert result.epochs_done == 2
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    data = _toy_data(64)
    norm = Normalisation.from_images(data.images)
    ckpt = tmp_path / "c.pt"
    config = TrainConfig(epochs=1, batch_size=32)
    train_model(
        _fresh_model(), data, norm, config, checkpoint=ckpt, progress=False, device=torch.device("cpu")
    )
    with pytest.raises(ConfigError, match="resume with the same settings"):
        train_model(
            _fresh_model(),
            data,
            norm,
            TrainConfig(epochs=1, batch_size=16),
            checkpoint=ckpt,
            resume=True,
            progress=False,
            device=torch.device("cpu"),
        )


def _initial_weights_digest(seed: int) -> str:
    """Digest of a seeded model's initial weights, built in a new interpreter (torch seeds its global
    generator from the OS at start-up, which only a fresh process shows)."""
    import subprocess
    import sys

    code = (
        "import hashlib, torch; from offline.train import build_seeded_model; "
        f"m = build_seeded_model('resnet20', 10, 1, {seed}); "
        "print(hashlib.sha256(b''.join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest())"
    )
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, check=True, capture_output=True, text=True
    ).stdout


# two fresh interpreters importing torch; test_train_twice_with_one_seed_gives_one_cnn checks seeding
# in-process
@pytest.mark.slow
def test_the_same_seed_gives_the_same_initial_cnn_in_every_process() -> None:
    from offline.train import build_seeded_model

    assert _initial_weights_digest(0) == _initial_weights_digest(0)
    assert _initial_weights_digest(0) != _initial_weights_digest(1)
    # The caller's random stream is left where it was.
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_seeded_model("resnet20", 10, 1, 0)
    assert torch.equal(torch.rand(3), expected)


def _robust_accuracy(model: torch.nn.Module, norm: Normalisation, data: ImageArrays, eps: float) -> float:
    """Accuracy under a 10-step PGD-linf made by torchattacks directly (not through predgate)."""
    import torchattacks

    pixel_model = PixelModel(model, norm).eval()
    x, y = to_pixels(data.images), torch.from_numpy(data.labels)
    torch.manual_seed(1)
    adv = torchattacks.PGD(pixel_model, eps=eps, alpha=2.5 * eps / 10, steps=10, random_start=True)(x, y)
    with torch.no_grad():
        return float((pixel_model(adv).argmax(1) == y).float().mean())


def test_adversarial_training_makes_the_model_robust_where_natural_training_does_not() -> None:
    data, test = _toy_data(160), _toy_data(120, seed=1)
    norm = Normalisation.from_images(data.images)
    robust = {}
    for attack in (None, "pgd-linf"):
        model = _fresh_model()
        config = TrainConfig(
            epochs=3,
            batch_size=32,
            max_lr=0.05,
            adv_attack=attack,
            adv_eps=0.15 if attack else 0.0,
            adv_steps=3,
        )
        train_model(model, data, norm, config, progress=False, device=torch.device("cpu"))
        assert accuracy(model, norm.apply(test.images), torch.from_numpy(test.labels)) > 0.9
        robust[attack] = _robust_accuracy(model, norm, test, eps=0.15)
    assert robust["pgd-linf"] > 0.9 > robust[None] + 0.3, robust


def test_adversarial_training_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="adversarial training takes"):
        TrainConfig(adv_attack="fgsm", adv_eps=0.1)
    with pytest.raises(ConfigError, match="eps > 0"):
        TrainConfig(adv_attack="pgd-l2", adv_eps=0.0)
    assert TrainConfig().adv_spec() is None
    spec = TrainConfig(adv_attack="pgd-l2", adv_eps=0.5, adv_steps=7).adv_spec()
    assert spec is not None and (spec.name, spec.eps, spec.steps) == ("pgd-l2", 0.5, 7)

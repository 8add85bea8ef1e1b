"""models.attacks against torchattacks called directly on the same normalised model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchattacks

from models.architectures import build_model
from models.attacks import AttackSpec, PixelModel, attack_batch, predict_pixels, to_pixels, to_uint8
from models.bundle import load_bundle
from models.data import load_splits
from models.errors import ConfigError
from models.preprocess import Normalisation


@pytest.fixture(scope="module")
def loaded(tiny_bundle: Path):  # type: ignore[no-untyped-def]
    bundle = load_bundle(tiny_bundle)
    test = load_splits(bundle)["test"]
    return bundle.load_model("cpu").eval(), bundle.normalisation, test.images[:64], test.labels[:64]


@pytest.mark.parametrize(
    "spec",
    [
        AttackSpec("fgsm", eps=0.1),
        AttackSpec("pgd-linf", eps=0.1, steps=5),
        AttackSpec("pgd-l2", eps=1.0, steps=5),
    ],
    ids=lambda s: s.name,
)
def test_matches_torchattacks_direct(loaded, spec: AttackSpec) -> None:  # type: ignore[no-untyped-def]
    model, norm, images, labels = loaded
    ours = attack_batch(spec, model, norm, images, labels, seed=3)
    # Direct: torchattacks on the raw CNN, pixel inputs built by hand.
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    y = torch.as_tensor(labels)
    cls = {"fgsm": torchattacks.FGSM, "pgd-linf": torchattacks.PGD, "pgd-l2": torchattacks.PGDL2}[spec.name]
    kwargs = (
        {"eps": spec.eps}
        if spec.name == "fgsm"
        else {"eps": spec.eps, "alpha": spec.step_size, "steps": spec.steps}
    )
    direct = cls(model, **kwargs)
    # torchattacks' own normalisation handling: normalised inputs in, normalised adversarial out
    # (the attack itself runs in pixel space), so eps is in pixel units on this route too.
    direct.set_normalization_used(mean=list(norm.mean), std=list(norm.std))
    torch.manual_seed(3)
    theirs = direct.inverse_normalize(direct(norm.apply(images), y))
    # Equal up to float noise: normalise / inverse-normalise round trips differ by ~1e-7, which a
    # sign step can flip on a few near-zero gradient pixels of the iterative attacks.
    assert float((ours - theirs).abs().mean()) < 2e-3
    # budget respected, in pixel units
    delta = (ours - x).flatten(1)
    if spec.name == "pgd-l2":
        assert float(delta.norm(dim=1).max()) <= spec.eps + 1e-4
    else:
        assert float(delta.abs().max()) <= spec.eps + 1e-6
    # success rates equal, and the attack does hurt: adversarial accuracy below clean accuracy
    clean = predict_pixels(model, norm, x)
    ours_pred = predict_pixels(model, norm, ours)
    with torch.no_grad():
        theirs_pred = (
            model(
                (theirs - torch.tensor(norm.mean).view(1, -1, 1, 1))
                / torch.tensor(norm.std).view(1, -1, 1, 1)
            )
            .argmax(1)
            .numpy()
        )
    assert abs((ours_pred != labels).mean() - (theirs_pred != labels).mean()) <= 2 / len(labels)
    assert (ours_pred == labels).mean() < (clean == labels).mean()


def test_pixel_model_equals_normalised_forward(loaded) -> None:  # type: ignore[no-untyped-def]
    model, norm, images, _ = loaded
    with torch.no_grad():
        a = PixelModel(model, norm)(to_pixels(images))
        b = model(norm.apply(images))
    assert torch.allclose(a, b, atol=1e-5)


def test_uint8_round_trip(loaded) -> None:  # type: ignore[no-untyped-def]
    _, _, images, _ = loaded
    assert np.array_equal(to_uint8(to_pixels(images)), images)


def test_minimal_and_blackbox_attacks_run(loaded) -> None:  # type: ignore[no-untyped-def]
    model, norm, images, labels = loaded
    for spec in (
        AttackSpec("cw-l2", steps=20, cw_lr=0.05),
        AttackSpec("deepfool", steps=10),
        AttackSpec("square", eps=0.2, steps=50),
    ):
        adv = attack_batch(spec, model, norm, images[:16], labels[:16], seed=0)
        assert adv.shape == (16, 1, 28, 28) and float(adv.min()) >= 0 and float(adv.max()) <= 1
        if spec.name == "square":
            assert float((adv - to_pixels(images[:16])).abs().max()) <= spec.eps + 1e-6


def test_bad_spec() -> None:
    with pytest.raises(ConfigError):
        AttackSpec("jsma")
    with pytest.raises(ConfigError):
        AttackSpec("fgsm", eps=0)


def test_pgd_l2_on_colour_images_matches_torchattacks() -> None:
    # N x H x W x 3 uint8 permuted to N x 3 x H x W is not contiguous; torchattacks' PGD-l2 views
    # its perturbation flat and needs contiguous pixels (a CIFAR-10 bundle failed here).
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=8)
    norm = Normalisation.from_images(images)
    spec = AttackSpec("pgd-l2", eps=0.5, steps=3)
    ours = attack_batch(spec, model, norm, images, labels, seed=1)
    direct = torchattacks.PGDL2(model, eps=spec.eps, alpha=spec.step_size, steps=spec.steps)
    direct.set_normalization_used(mean=list(norm.mean), std=list(norm.std))
    torch.manual_seed(1)
    theirs = direct.inverse_normalize(direct(norm.apply(images).contiguous(), torch.as_tensor(labels)))
    assert float((ours - theirs).abs().mean()) < 2e-3
    x = to_pixels(images)
    assert float((ours - x).flatten(1).norm(dim=1).max()) <= spec.eps + 1e-4

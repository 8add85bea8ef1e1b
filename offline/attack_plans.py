"""The attacks ``predgate robustness --plan standard`` runs before its report, per data set.

Budgets from the seeds and the literature (issue: Fashion-MNIST l-inf 0.1 / 0.2 / 0.3; CIFAR-10
l-inf 4/255 and 8/255, l2 0.5), every attack of :data:`models.attacks.ATTACKS` once, and one attack
also made on the fit and val splits: the rows the ``adv`` detectors learn from
(:mod:`offline.adversarial_exposure`), chosen as the seeds' training attack (PGD-linf at the
smallest budget), so every other kind of attack measures them unseen.

DeepFool runs on fewer images (about 1.6 s per image on two CPU cores), as do the fit and val
attacks (rows to learn from, not to measure).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.attacks import AttackSpec
from models.errors import ConfigError


@dataclass(frozen=True)
class PlannedAttack:
    """One attack of a plan; ``images`` None: the plan's ``--images``."""

    spec: AttackSpec
    images: int | None = None


@dataclass(frozen=True)
class AttackPlan:
    """What one command runs: the measured attacks, and the one made on fit and val as well."""

    attacks: tuple[PlannedAttack, ...]
    exposure: AttackSpec
    exposure_images: int = 1000


_FASHION = AttackPlan(
    attacks=(
        *(PlannedAttack(AttackSpec("fgsm", eps=e)) for e in (0.1, 0.2, 0.3)),
        *(PlannedAttack(AttackSpec("pgd-linf", eps=e, steps=10)) for e in (0.1, 0.2, 0.3)),
        PlannedAttack(AttackSpec("pgd-l2", eps=1.5, steps=10)),
        PlannedAttack(AttackSpec("cw-l2", steps=100)),
        PlannedAttack(AttackSpec("deepfool", steps=50), images=200),
        PlannedAttack(AttackSpec("square", eps=0.1, steps=1000)),
    ),
    exposure=AttackSpec("pgd-linf", eps=0.1, steps=10),
)
_CIFAR = AttackPlan(
    attacks=(
        PlannedAttack(AttackSpec("fgsm", eps=8 / 255)),
        *(PlannedAttack(AttackSpec("pgd-linf", eps=e / 255, steps=10)) for e in (4, 8)),
        PlannedAttack(AttackSpec("pgd-l2", eps=0.5, steps=10)),
        PlannedAttack(AttackSpec("cw-l2", steps=100)),
        PlannedAttack(AttackSpec("deepfool", steps=50), images=200),
        PlannedAttack(AttackSpec("square", eps=8 / 255, steps=1000)),
    ),
    exposure=AttackSpec("pgd-linf", eps=4 / 255, steps=10),
)
PLANS: dict[str, AttackPlan] = {"fashion-mnist": _FASHION, "cifar10": _CIFAR}


def plan_for(dataset: str) -> AttackPlan:
    """The standard plan of a data set (image folders: the CIFAR-10 budgets, for natural images)."""
    if dataset == "imagefolder":
        return _CIFAR
    try:
        return PLANS[dataset]
    except KeyError:
        raise ConfigError(
            f"no standard attack plan for data set {dataset!r}; known: {sorted(PLANS)}"
        ) from None

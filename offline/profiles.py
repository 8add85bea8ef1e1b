"""Named build settings: ``quick`` (the default that ``make run`` builds) and ``full`` (the paper's).

A profile fixes what changes the cost of a build (epochs, split sizes, number of mutants); a CLI flag
overrides any one field. The chosen values are recorded in the bundle manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from models.errors import ConfigError
from models.signals import check_cond_inputs


@dataclass(frozen=True)
class BuildProfile:
    epochs: int
    cnn_train: int | None
    fit: int | None
    val: int | None
    test: int | None
    n_mutants: int
    operator: str = "NAI"
    mutation_rate: float = 0.005
    # Mutate only convs inside these modules (e.g. ("layer3",)): mutants share the computed prefix.
    mutant_modules: tuple[str, ...] | None = None
    # Early-stopping LCR: an SPRT with alpha = beta = this value over chunks of ``lcr_chunk`` mutants.
    lcr_sprt_alpha: float | None = None
    lcr_chunk: int = 10
    # What the conductance detector reads: "conductance" (the paper's) or "conductance+class".
    cond_inputs: str = "conductance"
    fit_is_cnn_train: bool = False
    val_from: str = "train"
    seed: int = 0
    batch_size: int = 128
    # Training: optimiser ("sgd" with Nesterov, "adam", "adamw"), peak learning rate of the one-cycle
    # schedule (None: 0.1 for SGD, 1e-3 for Adam / AdamW), weight decay, and augmentation (None: the
    # data set's recipe, flips and crops for natural images; False: none; True: flips and crops).
    optimizer: str = "sgd"
    lr: float | None = None
    weight_decay: float = 5e-4
    augment: bool | None = None
    # Adversarial training: "pgd-linf" or "pgd-l2" at radius adv_eps with adv_steps steps (the seeds'
    # 7-step PGD); None trains naturally.
    adv_train: str | None = None
    adv_eps: float = 0.1
    adv_steps: int = 7
    n_boot: int = 1000
    detector_seeds: int = 3
    # The signal set the server uses by default: a build set ("cond+lcr") or an open-world one as
    # VARIANT/SET ("exposed/feat+softmax", fitted after the detectors); None = the paper's set. Not a
    # fixed field: a finished bundle built with another default gets this one (and a new report).
    default_set: str | None = None

    def __post_init__(self) -> None:
        if self.mutant_modules is not None:  # JSON gives lists; keep comparisons with tuples exact
            object.__setattr__(self, "mutant_modules", tuple(self.mutant_modules))
        check_cond_inputs(self.cond_inputs)
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ConfigError(f"unknown optimiser {self.optimizer!r}; choose sgd, adam or adamw")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **overrides: Any) -> BuildProfile:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


STAGE_ORDER = ("prepare", "train", "conductance", "mutants", "features", "detectors", "report")

# The build stage each field belongs to: ``--redo STAGE`` may change the fields of STAGE and of the
# stages after it (they are recomputed), never those of earlier stages.
STAGE_OF_FIELD: dict[str, str] = {
    "cnn_train": "prepare",
    "fit": "prepare",
    "val": "prepare",
    "test": "prepare",
    "seed": "prepare",
    "fit_is_cnn_train": "prepare",
    "val_from": "prepare",
    "epochs": "train",
    "batch_size": "train",
    "optimizer": "train",
    "lr": "train",
    "weight_decay": "train",
    "augment": "train",
    "adv_train": "train",
    "adv_eps": "train",
    "adv_steps": "train",
    "n_mutants": "mutants",
    "operator": "mutants",
    "mutation_rate": "mutants",
    "mutant_modules": "mutants",
    "lcr_sprt_alpha": "features",
    "lcr_chunk": "features",
    "detector_seeds": "detectors",
    "cond_inputs": "detectors",
    "n_boot": "report",
}


def fixed_fields_differ(recorded: BuildProfile, requested: BuildProfile, redo: str | None) -> list[str]:
    """Fields that differ between the two profiles although their stage is not redone."""
    first_redone = STAGE_ORDER.index(redo) if redo is not None else len(STAGE_ORDER)
    return [
        name
        for name, stage in STAGE_OF_FIELD.items()
        if STAGE_ORDER.index(stage) < first_redone and getattr(recorded, name) != getattr(requested, name)
    ]


# Fashion-MNIST has 60k train / 10k test images.
PROFILES: dict[str, dict[str, BuildProfile]] = {
    "fashion-mnist": {
        # Well within 15 minutes on 2 CPU cores: a 2-epoch CNN on 30k images, 50 mutants, 6k images of
        # features.
        # Default set chosen by the open-world report of this profile's bundle (docs/open-world.md):
        # best mean AUROC over clean, shifted, unknown and mixed inputs at one forward pass.
        "quick": BuildProfile(
            epochs=2,
            cnn_train=30000,
            fit=2000,
            val=2000,
            test=2000,
            n_mutants=50,
            n_boot=300,
            default_set="exposed/cond+feat+softmax",
        ),
        "full": BuildProfile(epochs=3, cnn_train=50000, fit=5000, val=5000, test=None, n_mutants=100),
    },
    # The paper's CIFAR-10 setting: the 10k test images split evenly into val and test.
    "cifar10": {
        "quick": BuildProfile(
            epochs=2, cnn_train=20000, fit=1500, val=1000, test=1500, n_mutants=50, n_boot=300
        ),
        "full": BuildProfile(
            epochs=30,
            cnn_train=45000,
            fit=5000,
            val=5000,
            test=5000,
            n_mutants=100,
            mutation_rate=0.005,
            val_from="test",
            # Chosen by this profile's own open-world report (docs/open-world.md, CIFAR-10), as for
            # the quick Fashion-MNIST profile: the same set ranks first there.
            default_set="exposed/cond+feat+softmax",
        ),
    },
    # Caller-provided image folders: sizes are fractions the caller overrides as needed.
    "imagefolder": {
        "quick": BuildProfile(
            epochs=2, cnn_train=None, fit=200, val=200, test=None, n_mutants=20, n_boot=300
        ),
        "full": BuildProfile(epochs=30, cnn_train=None, fit=1000, val=1000, test=None, n_mutants=100),
    },
}


def get_profile(dataset: str, name: str) -> BuildProfile:
    try:
        by_name = PROFILES[dataset]
    except KeyError as exc:
        raise ConfigError(f"no build profiles for dataset {dataset!r}; known: {sorted(PROFILES)}") from exc
    try:
        return by_name[name]
    except KeyError as exc:
        raise ConfigError(f"unknown profile {name!r}; choose one of {sorted(by_name)}") from exc

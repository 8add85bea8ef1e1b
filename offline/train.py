"""Train the CNN that the gate protects: SGD + Nesterov (or Adam / AdamW), one-cycle or cosine, resumable.

Checkpoints are written after every epoch so a long CIFAR-10 run on a CPU can be stopped and
continued with ``--resume`` without changing the result it converges to.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from models.architectures import ModelSpec
from models.attacks import AttackSpec, PixelModel, make_attack, to_pixels
from models.data import ImageArrays
from models.devices import resolve_device
from models.errors import ConfigError
from models.preprocess import Normalisation
from offline.augment import augment_images


@dataclass
class TrainConfig:
    """Hyper-parameters, recorded in the bundle manifest as they were used."""

    epochs: int = 3
    batch_size: int = 128
    max_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # or "cosine"
    flip: bool = False
    crop_padding: int = 0
    seed: int = 0
    optimizer: str = "sgd"  # or "adam", "adamw"
    # Adversarial training (Madry et al. 2018, as the seeds train their robust models): each batch
    # is replaced by its PGD version ("pgd-linf" or "pgd-l2", radius adv_eps in [0, 1] pixel units,
    # adv_steps steps of adv_alpha, None: 2.5 * eps / steps) before the update. None: natural training.
    adv_attack: str | None = None
    adv_eps: float = 0.0
    adv_steps: int = 7
    adv_alpha: float | None = None

    def __post_init__(self) -> None:
        if self.adv_attack is not None:
            if self.adv_attack not in ADV_TRAIN_ATTACKS:
                raise ConfigError(
                    f"adversarial training takes {list(ADV_TRAIN_ATTACKS)}, not {self.adv_attack!r}"
                )
            self.adv_spec()  # checks the budget

    def adv_spec(self) -> AttackSpec | None:
        """The attack each training batch is replaced by, or None for natural training."""
        if self.adv_attack is None:
            return None
        return AttackSpec(self.adv_attack, eps=self.adv_eps, steps=self.adv_steps, alpha=self.adv_alpha)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


ADV_TRAIN_ATTACKS = ("pgd-linf", "pgd-l2")


OPTIMIZERS = ("sgd", "adam", "adamw")
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}
"""Peak learning rate of the one-cycle schedule per optimiser when none is given."""


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.max_lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=True,
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.max_lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.max_lr, weight_decay=config.weight_decay)
    raise ConfigError(f"unknown optimiser {config.optimizer!r}; choose one of {list(OPTIMIZERS)}")


@dataclass
class TrainResult:
    epochs_done: int
    history: list[dict[str, float]] = field(default_factory=list)
    wall_seconds: float = 0.0


def _make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.max_lr, total_steps=total)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total))
        )
    raise ConfigError(f"unknown schedule {config.schedule!r}; choose 'onecycle' or 'cosine'")


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, batch_size: int = 512, device: torch.device | None = None
) -> torch.Tensor:
    """Logits of an eval-mode model over a normalised tensor, in batches (returned on the CPU)."""
    device = device or next(model.parameters()).device
    model.eval()
    outs = [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    logits = predict_logits(model, x, batch_size)
    return float((logits.argmax(1) == torch.as_tensor(y)).float().mean())


def train_model(
    model: nn.Module,
    train: ImageArrays,
    normalisation: Normalisation,
    config: TrainConfig,
    *,
    val: ImageArrays | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    device: torch.device | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train in place on cnn-train; augmentation acts on raw pixels, then each batch is normalised
    by ``normalisation.apply``, the same call the gate makes at serve time.

    With ``resume`` and an existing checkpoint, model, optimiser, schedule and random state are
    restored and training continues at the next epoch.
    """
    device = device or resolve_device()
    torch.manual_seed(config.seed)
    model.to(device)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    raw_images = torch.from_numpy(train.images)
    y_train = torch.from_numpy(train.labels)
    x_val = normalisation.apply(val.images) if val is not None else None
    optimizer = make_optimizer(model, config)
    scheduler = _make_scheduler(optimizer, config, steps_per_epoch)
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult(epochs_done=0)
    if resume and checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        # a checkpoint made before a field existed holds that field's default
        if {**TrainConfig().to_dict(), **state["config"]} != config.to_dict():
            raise ConfigError(
                f"checkpoint {checkpoint} was made with {state['config']}, not {config.to_dict()}; "
                "resume with the same settings or start afresh"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        result = TrainResult(state["epochs_done"], state["history"], state["wall_seconds"])
    loss_fn = nn.CrossEntropyLoss()
    # Adversarial training attacks the model in eval mode (torchattacks switches the wrapper to eval
    # for the attack and back to train for the update), so the attack's forwards leave BN alone.
    spec = config.adv_spec()
    pixel_model = PixelModel(model, normalisation).to(device) if spec is not None else None
    attack = make_attack(spec, pixel_model) if spec is not None and pixel_model is not None else None
    for epoch in range(result.epochs_done, config.epochs):
        start = time.perf_counter()
        (pixel_model or model).train()
        order = torch.randperm(len(train), generator=generator)
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress)
        for step in bar:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            raw = augment_images(raw_images[idx], config.flip, config.crop_padding, generator)
            yb = y_train[idx].to(device)
            if attack is not None and pixel_model is not None:
                logits = pixel_model(attack(to_pixels(raw).to(device), yb))
            else:
                logits = model(normalisation.apply(raw).to(device))
            loss = loss_fn(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            loss_sum += loss.item() * len(idx)
            if step % 20 == 0 or step == steps_per_epoch - 1:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc_running": correct / seen}
        if val is not None and x_val is not None:
            record["val_acc"] = accuracy(model, x_val, torch.from_numpy(val.labels))
        record["seconds"] = time.perf_counter() - start
        result.history.append(record)
        result.epochs_done = epoch + 1
        result.wall_seconds += record["seconds"]
        if progress:
            tqdm.write(
                " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
            )
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save(
                {
                    "config": config.to_dict(),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "epochs_done": result.epochs_done,
                    "history": result.history,
                    "wall_seconds": result.wall_seconds,
                },
                tmp,
            )
            tmp.replace(checkpoint)
    model.eval()
    return result


def build_seeded_model(
    arch: str | ModelSpec, num_classes: int = 10, in_channels: int = 3, seed: int = 0
) -> nn.Module:
    """A freshly initialised model whose initial weights depend on ``seed`` alone (``arch``: a
    :class:`ModelSpec`, or an architecture name with ``num_classes`` and ``in_channels``).

    torch seeds its global generator from the OS at start-up, so a model built without a seed gets
    different initial weights in every process, and ``predgate train`` with the same seed would not
    give the same CNN twice. The caller's global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        spec = arch if isinstance(arch, ModelSpec) else ModelSpec(arch, num_classes, in_channels)
        return spec.build()

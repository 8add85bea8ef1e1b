"""Where the model runs: the one reading of a device setting for training, the offline jobs and the server."""

from __future__ import annotations

import torch

from models.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else the CPU; ``cuda`` must be available (no silent fallback);
    any other torch device string (``cpu``, ``cuda:1``) as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device

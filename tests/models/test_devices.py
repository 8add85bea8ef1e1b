"""The one reading of a device setting."""

from __future__ import annotations

import pytest
import torch

from models.devices import resolve_device
from models.errors import ConfigError


def test_auto_is_cuda_when_present_else_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_cuda_without_cuda_and_unknown_names_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("gpu")
    assert resolve_device("cpu") == torch.device("cpu")

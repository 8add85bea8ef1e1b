from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, get_settings


def test_environment_prefix_and_types(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PREDGATE_BUNDLE", str(tmp_path))
    monkeypatch.setenv("PREDGATE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("PREDGATE_API_KEY", "s3cret")
    monkeypatch.setenv("PREDGATE_RESIZE", "refuse")
    monkeypatch.setenv("PREDGATE_WARMUP", "false")
    settings = Settings()  # type: ignore[call-arg]
    assert settings.bundle == tmp_path
    assert settings.max_batch_size == 7
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)  # a secret never shows in logs
    assert settings.resize == "refuse" and settings.warmup is False
    assert settings.signal_set is None and settings.operating_point is None


def test_invalid_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="resize"):
        Settings(bundle=tmp_path, resize="stretch")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="max_batch_size"):
        Settings(bundle=tmp_path, max_batch_size=0)
    with pytest.raises(ValidationError, match="device"):
        Settings(bundle=tmp_path, device="tpu")  # type: ignore[arg-type]


def test_get_settings_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PREDGATE_BUNDLE", str(tmp_path))
    get_settings.cache_clear()
    try:
        first = get_settings()
        monkeypatch.setenv("PREDGATE_BUNDLE", str(tmp_path / "other"))
        assert get_settings() is first
    finally:
        get_settings.cache_clear()

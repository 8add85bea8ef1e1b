"""The project's exceptions, so that the service can map each kind to one HTTP status in one place."""

from __future__ import annotations

from sklearn.exceptions import NotFittedError as _SklearnNotFittedError


class PredgateError(Exception):
    """Base class: anything predgate raises on purpose."""


class BundleError(PredgateError):
    """A bundle (or a model description inside one) is invalid, incomplete or tampered with."""


class InputError(PredgateError, ValueError):
    """A caller's input cannot be read as what the bundle expects (maps to HTTP 422)."""


class NotFittedError(_SklearnNotFittedError, PredgateError):
    """A detector was used before ``fit``; also an sklearn ``NotFittedError`` so sklearn tools agree."""


class ConfigError(PredgateError, ValueError):
    """A setting or option has a value outside the documented choices."""

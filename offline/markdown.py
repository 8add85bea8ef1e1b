"""How the reports write numbers in markdown: the one formatting of a value, an interval and a CI."""

from __future__ import annotations

import math
from typing import Any


def fmt(value: float | None, digits: int = 4) -> str:
    """``value`` to ``digits`` decimals; an en dash for a missing or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def signed_ci(ci: tuple[float, float] | list[float], digits: int = 4) -> str:
    """A CI of a difference, with signs: ``[-0.0012, +0.0034]``."""
    return f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def interval(ci: tuple[float, float] | list[float], digits: int = 3) -> str:
    """A CI of a value that is never negative (an AUROC): no signs."""
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def fit_source(manifest: dict[str, Any]) -> str:
    """What the bundle's detectors were trained on, as a phrase. With imported weights the fit split
    is held out from the CNN's training images only if a ``--exclude-indices`` file named them."""
    splits = manifest["splits"]
    if splits.get("fit_is_cnn_train"):
        return f"**{splits['sizes']['fit']} of the CNN's own training images** (the paper's setting)"
    named = splits.get("cnn_train_indices")
    if named:
        return (
            f"a **held-out fit split** of {splits['sizes']['fit']} images the CNN never saw (the "
            f"{named['count']} images it was trained on, named by "
            f"{named.get('given_as') or 'the index file'}, were left out)"
        )
    if (manifest.get("training") or {}).get("imported_weights"):
        return (
            f"a fit split of {splits['sizes']['fit']} images that **may overlap the CNN's training data** "
            "(the weights were imported and no --exclude-indices file named the images they were trained on)"
        )
    return f"a **held-out fit split** of {splits['sizes']['fit']} images the CNN never saw"

"""Per-split evidence tables: what the detectors are fitted on and the report is computed from.

Extraction goes through :class:`models.evidence.EvidenceExtractor`, the same object the server runs,
so offline and online features are equal by construction (and a test checks it).
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from models.data import ImageArrays
from models.evidence import EvidenceExtractor
from models.preprocess import Normalisation
from models.sequential_lcr import EarlyStopping


def extract_features(
    extractor: EvidenceExtractor,
    normalisation: Normalisation,
    arrays: ImageArrays,
    *,
    with_lcr: bool = True,
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "features",
) -> dict[str, np.ndarray]:
    """Columns per image: ``label``, ``logits`` (N x K), ``prediction``, ``conductance`` (N x C),
    and with mutants ``lcr`` and ``mutant_labels`` (M x N, int16).

    Every mutant labels every image even where the bundle stops LCR early: the early-stopped LCR
    is then replayed from these labels (:func:`apply_early_stopping`), equal to the live one."""
    parts: dict[str, list[np.ndarray]] = {"logits": [], "prediction": [], "conductance": []}
    if with_lcr:
        parts.update(lcr=[], mutant_labels=[])
    starts = range(0, len(arrays), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        x = normalisation.apply(arrays.images[start : start + batch_size])
        evidence = extractor(x, conductance=True, lcr=with_lcr, early_stop=False)
        parts["logits"].append(evidence.logits.numpy())
        parts["prediction"].append(evidence.prediction.numpy())
        assert evidence.conductance is not None
        parts["conductance"].append(evidence.conductance.numpy())
        if with_lcr:
            assert evidence.lcr is not None and evidence.mutant_labels is not None
            parts["lcr"].append(evidence.lcr.numpy())
            parts["mutant_labels"].append(evidence.mutant_labels.numpy().astype(np.int16))
    out = {
        key: np.concatenate(values, axis=1 if key == "mutant_labels" else 0) for key, values in parts.items()
    }
    out["label"] = arrays.labels.astype(np.int64)
    return out


def apply_early_stopping(
    features: dict[str, np.ndarray], stopping: EarlyStopping | None
) -> dict[str, np.ndarray]:
    """The split's columns with ``lcr`` as the gate computes it under ``stopping``.

    The all-mutant LCR is kept as ``lcr_full`` (and is the base when called again, so switching
    the setting never compounds); ``mutants_used`` says how many mutants each image needed.
    """
    out = dict(features)
    full = out.setdefault("lcr_full", out["lcr"])
    if stopping is None:
        out["lcr"] = full
        out["mutants_used"] = np.full(len(full), len(out["mutant_labels"]), dtype=np.int64)
        return out
    lcr, used = stopping.replay(out["mutant_labels"].astype(np.int64), out["prediction"])
    out["lcr"], out["mutants_used"] = lcr.astype(np.float32), used
    return out

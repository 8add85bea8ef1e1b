"""The gate's evidence of stored adversarial images and of the clean images they were made from.

``predgate robustness`` and the detectors fitted with adversarial rows both read the same tables: the
bundle's features (what the build stores: logits, prediction, conductance, LCR under the bundle's
early-stopping rule), plus, where the gate serves open-world sets, the penultimate features' scores
(and the perturbed DOCTOR score where a set reads it), computed by the same scorers the gate uses.
Evidence of the rounded adversarial images is cached beside them (``adversarial/<tag>/evidence.npz``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.bundle import Bundle, adversarial_evidence_file
from models.data import ImageArrays, load_splits
from models.gate import Gate, load_early_stopping
from models.signals import OPEN_WORLD_SIGNALS, signal_matrix
from offline.attack import attacked_split, load_adversarial
from offline.features import apply_early_stopping, extract_features
from offline.open_world import penultimate_features, perturbed_scores


def needs_open_world(gate: Gate) -> bool:
    return gate.open_world is not None


def needs_perturbation(gate: Gate) -> bool:
    return any("doctor_pert" in s.signals for s in gate.signal_sets.values())


def open_world_extra(gate: Gate, bundle: Bundle, images: np.ndarray) -> dict[str, np.ndarray]:
    """The raw open-world inputs of ``images`` the gate's scorers read: penultimate features (one
    forward pass) and, where a stored set reads it, the perturbed DOCTOR score (one backward pass)."""
    if gate.open_world is None:
        return {}
    out = {"penultimate": penultimate_features(gate.extractor.model, bundle.normalisation, images)}
    if needs_perturbation(gate):
        out["doctor_pert"] = perturbed_scores(gate.open_world.perturbed, bundle.normalisation, images)
    return out


def with_open_world_columns(gate: Gate, table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``table`` plus every open-world signal column, from its penultimate features (if any)."""
    if gate.open_world is None or "penultimate" not in table:
        return table
    columns = gate.open_world.scorers.columns(table["logits"], table["penultimate"], table.get("doctor_pert"))
    return {**table, **columns}


def adversarial_evidence(
    bundle: Bundle, gate: Gate, tag: str, images: int | None = None, progress: bool = False
) -> dict[str, np.ndarray]:
    """The gate's evidence of ``tag``'s rounded adversarial images with the attacked split's true
    labels, the early-stopping rule applied and the open-world columns added (cached in the bundle)."""
    adv = load_adversarial(bundle, tag, images)
    split = load_splits(bundle)[attacked_split(bundle, tag)]
    name = adversarial_evidence_file(tag)
    table: dict[str, np.ndarray] | None = None
    if bundle.has_file(name) and (bundle.path / name).exists():
        cached = dict(bundle.read_arrays(name))
        if len(cached["index"]) == len(adv["index"]) and np.array_equal(cached["index"], adv["index"]):
            table = cached
    if table is None:
        arrays = ImageArrays(adv["images"], split.labels[adv["index"]], bundle.class_names)
        table = extract_features(
            gate.extractor,
            bundle.normalisation,
            arrays,
            with_lcr=gate.extractor.ensemble is not None,
            progress=progress,
            desc=f"evidence {tag}",
        )
        table["index"] = adv["index"]
    missing_open = needs_open_world(gate) and (
        "penultimate" not in table or (needs_perturbation(gate) and "doctor_pert" not in table)
    )
    if missing_open or not bundle.has_file(name):
        table.update(open_world_extra(gate, bundle, adv["images"]))
        bundle.write_arrays(name, table)
        bundle.save()
    stopping = load_early_stopping(bundle)
    if stopping is not None and "mutant_labels" in table:
        table = apply_early_stopping(table, stopping)
    return with_open_world_columns(gate, table)


def take_rows(table: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``rows`` of a feature table (``mutant_labels`` is mutants x images)."""
    return {k: (v[:, rows] if k == "mutant_labels" else v[rows]) for k, v in table.items() if np.ndim(v) >= 1}


def split_evidence(bundle: Bundle, gate: Gate, split: str, rows: np.ndarray | None = None) -> dict[str, Any]:
    """The bundle's stored features of ``split`` (rows ``rows``, all when None), early-stopping rule
    applied, with the open-world columns computed for those images when the gate serves such sets."""
    table = dict(bundle.read_features(split))
    stopping = load_early_stopping(bundle)
    if stopping is not None and "mutant_labels" in table:
        table = apply_early_stopping(table, stopping)
    if rows is not None:
        table = take_rows(table, rows)
    if needs_open_world(gate):
        images = load_splits(bundle)[split].images
        table.update(open_world_extra(gate, bundle, images if rows is None else images[rows]))
    return with_open_world_columns(gate, table)


def set_scores(gate: Gate, name: str, table: dict[str, np.ndarray]) -> np.ndarray:
    """Signal set ``name``'s unified score of every row, as :meth:`Gate.run` computes it."""
    chosen = gate.signal_set(name)
    cond = None
    if "cond" in chosen.signals:
        cond = gate.cond_score(table["conductance"].astype(np.float64), table["prediction"], chosen)
    return chosen.classifier.decision_function(
        signal_matrix(chosen.signals, table["logits"], cond, table.get("lcr"), extra=table)
    )


def scorable_sets(gate: Gate) -> list[str]:
    """The stored sets whose evidence these tables hold (open-world ones only with the scorers)."""
    return [
        name
        for name, chosen in gate.signal_sets.items()
        if gate.open_world is not None or not any(sig in OPEN_WORLD_SIGNALS for sig in chosen.signals)
    ]


@dataclass(frozen=True)
class AttackRows:
    """Which rows of one attack each setting reads, from its clean and adversarial tables (same
    images, same order): Wang et al.'s setting (successful adversarial vs. clean correct) and the
    any-reason mix (clean and adversarial rows, wrong vs. correct)."""

    clean_correct: np.ndarray
    fooled: np.ndarray
    mix_wrong: np.ndarray

    @classmethod
    def of(cls, clean: dict[str, np.ndarray], adv: dict[str, np.ndarray]) -> AttackRows:
        label = adv["label"]
        clean_correct = clean["prediction"] == label
        return cls(
            clean_correct=clean_correct,
            fooled=clean_correct & (adv["prediction"] != label),
            mix_wrong=np.concatenate([clean["prediction"] != label, adv["prediction"] != label]),
        )

    @property
    def wang_target(self) -> np.ndarray:
        return np.r_[np.zeros(int(self.clean_correct.sum())), np.ones(int(self.fooled.sum()))].astype(int)

    def wang(self, clean_scores: np.ndarray, adv_scores: np.ndarray) -> np.ndarray:
        """Scores of the clean correct rows, then of the successful adversarial ones."""
        return np.concatenate([clean_scores[self.clean_correct], adv_scores[self.fooled]])

    @staticmethod
    def mix(clean_scores: np.ndarray, adv_scores: np.ndarray) -> np.ndarray:
        """Scores of every clean row, then of every adversarial row."""
        return np.concatenate([clean_scores, adv_scores])

"""The gate: CNN prediction, conductance, LCR, detectors and verdict, as one call.

Offline feature extraction and the online service both go through
:class:`models.evidence.EvidenceExtractor` and :class:`Gate`, so the numbers a detector was fitted
on are the numbers it sees when serving.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from models.bundle import CONDUCTANCE_FILE, MUTANTS_FILE, Bundle
from models.conductance import LayerConductance, ShortcutConductance
from models.detector_state import load_state
from models.detectors import ConductanceDetector, UnifiedClassifier
from models.errors import BundleError, ConfigError
from models.evidence import EvidenceExtractor
from models.lcr import MutantEnsemble
from models.mutation import MutantSet, mutant_weights_hash
from models.onnx_backend import onnx_extractor
from models.open_world_evidence import OpenWorldProbe, OpenWorldScorers
from models.operating_points import OperatingPoint
from models.prefix_ensemble import PrefixSharingEnsemble
from models.sequential_lcr import EarlyStopping
from models.signals import (
    OPEN_WORLD_SIGNALS,
    check_cond_inputs,
    check_signals,
    conductance_inputs,
    needs_conductance,
    needs_lcr,
    signal_matrix,
)


@dataclass
class SignalSet:
    """One verdict recipe: which signals, the classifier over them, its operating points."""

    name: str
    signals: tuple[str, ...]
    classifier: UnifiedClassifier
    operating_points: dict[str, OperatingPoint]
    default_point: str
    # The set's own conductance detector (one fitted with exposure rows); None = the gate's.
    cond_detector: ConductanceDetector | None = None

    def point(self, name: str | None) -> OperatingPoint:
        name = name or self.default_point
        try:
            return self.operating_points[name]
        except KeyError:
            raise ConfigError(
                f"unknown operating point {name!r} for signal set {self.name!r}; "
                f"stored: {sorted(self.operating_points)}"
            ) from None


Verdict = Literal["accept", "unknown"]


@dataclass(frozen=True, eq=False)
class GatePlan:
    """A signal set and operating point resolved once (by :meth:`Gate.plan`), for every image of a
    group: the names are checked when a request arrives, and the objects travel with its images to
    :meth:`Gate.run`. Plans compare and hash by :attr:`key` (the names), so they are the batcher's
    group key."""

    signal_set: SignalSet
    point: OperatingPoint
    full_evidence: bool = False

    @property
    def key(self) -> tuple[str, str, bool]:
        return self.signal_set.name, self.point.name, self.full_evidence

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GatePlan) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def set_name(self) -> str:
        return self.signal_set.name

    @property
    def point_name(self) -> str:
        return self.point.name

    @property
    def needs_conductance(self) -> bool:
        return self.full_evidence or needs_conductance(self.signal_set.signals)

    @property
    def needs_lcr(self) -> bool:
        return self.full_evidence or needs_lcr(self.signal_set.signals)

    @property
    def needs_open_world(self) -> bool:
        return any(s in OPEN_WORLD_SIGNALS for s in self.signal_set.signals)


@dataclass
class GateOutput:
    """Per-image results of :meth:`Gate.run` (numpy, CPU); ``None`` where a signal was not computed.

    The one result type from the gate to the response: the service answers each image from its row of
    the batch's output (``len`` rows), never from a copy.
    """

    logits: np.ndarray
    probabilities: np.ndarray
    prediction: np.ndarray
    conductance: np.ndarray | None
    cond_score: np.ndarray | None
    lcr: np.ndarray | None
    unified_score: np.ndarray
    reject: np.ndarray
    signal_set: str
    operating_point: OperatingPoint
    seconds: dict[str, float]
    mutants_used: np.ndarray | None = None  # per image, where LCR stopped early

    def __len__(self) -> int:
        return len(self.prediction)

    def verdict(self, i: int) -> Verdict:
        """Image ``i``'s verdict, from the operating point's decision (the one place it is spelt)."""
        return "unknown" if self.reject[i] else "accept"


class Gate:
    """Everything needed to turn a normalised batch into predictions with verdicts."""

    def __init__(
        self,
        extractor: EvidenceExtractor,
        cond_detector: ConductanceDetector | None,
        signal_sets: dict[str, SignalSet],
        default_set: str,
        cond_inputs: str = "conductance",
        num_classes: int | None = None,
        open_world: OpenWorldProbe | None = None,
    ) -> None:
        if default_set not in signal_sets:
            raise BundleError(f"default signal set {default_set!r} is not among {sorted(signal_sets)}")
        self.extractor = extractor
        self.cond_detector = cond_detector
        self.signal_sets = signal_sets
        self.default_set = default_set
        self.cond_inputs = check_cond_inputs(cond_inputs)
        self.num_classes = num_classes
        self.open_world = open_world
        self.point_names = frozenset(name for s in signal_sets.values() for name in s.operating_points)
        """Every operating point name of any set: what a request may name (checked per request)."""
        needing = [n for n, s in signal_sets.items() if any(sig in OPEN_WORLD_SIGNALS for sig in s.signals)]
        if needing and open_world is None:
            raise BundleError(
                f"signal sets {needing} need the open-world scorers, which the gate was not given"
            )

    def cond_score(
        self, conductance: np.ndarray, prediction: np.ndarray, chosen: SignalSet | None = None
    ) -> np.ndarray:
        """The conductance detector's score of ``N x C`` conductance for the CNN's ``prediction``,
        from the inputs the detector was fitted on (the one place that builds them online). A set
        with its own conductance detector (``chosen``) is scored by it; without one, and for None, the
        bundle's conductance detector scores."""
        own = chosen.cond_detector if chosen is not None else None
        detector = own if own is not None else self.cond_detector
        if detector is None:
            raise ConfigError("this gate has no conductance detector")
        x = conductance_inputs(conductance, prediction, self.cond_inputs, self.num_classes)
        return detector.decision_function(x)

    def signal_set(self, name: str | None) -> SignalSet:
        name = name or self.default_set
        try:
            return self.signal_sets[name]
        except KeyError:
            raise ConfigError(f"unknown signal set {name!r}; stored: {sorted(self.signal_sets)}") from None

    def plan(
        self, signal_set: str | None = None, operating_point: str | None = None, full_evidence: bool = False
    ) -> GatePlan:
        """The named set and point (None: the defaults) resolved into the objects :meth:`run` uses;
        an unknown name raises :class:`ConfigError` naming what is stored."""
        chosen = self.signal_set(signal_set)
        return GatePlan(chosen, chosen.point(operating_point), bool(full_evidence))

    def run(
        self,
        x: torch.Tensor,
        *,
        plan: GatePlan | None = None,
        signal_set: str | None = None,
        operating_point: str | None = None,
        full_evidence: bool = False,
    ) -> GateOutput:
        """Predict, gather the evidence the signal set needs (all of it with ``full_evidence``),
        score and decide. ``plan`` (from :meth:`plan`) replaces the three names."""
        if plan is None:
            plan = self.plan(signal_set, operating_point, full_evidence)
        chosen, point = plan.signal_set, plan.point
        want_open = plan.needs_open_world
        if want_open:
            assert self.open_world is not None  # checked at construction
            self.open_world.reset()  # the forward below leaves its penultimate features in the probe
        evidence = self.extractor(x, conductance=plan.needs_conductance, lcr=plan.needs_lcr)
        seconds = dict(evidence.seconds)
        start = time.perf_counter()
        cond_score = None
        conductance = evidence.conductance.numpy() if evidence.conductance is not None else None
        prediction = evidence.prediction.numpy()
        has_detector = self.cond_detector is not None or chosen.cond_detector is not None
        if conductance is not None and has_detector:
            cond_score = self.cond_score(conductance, prediction, chosen)  # float64 once, in its inputs
        logits = evidence.logits.numpy()
        lcr = evidence.lcr.numpy() if evidence.lcr is not None else None
        extra = None
        if want_open:
            assert self.open_world is not None
            extra = self.open_world.columns(
                x.to(self.extractor.device), logits, perturbation="doctor_pert" in chosen.signals
            )
        unified = chosen.classifier.decision_function(
            signal_matrix(chosen.signals, logits, cond_score, lcr, extra=extra)
        )
        seconds["detectors"] = time.perf_counter() - start
        return GateOutput(
            logits=logits,
            probabilities=torch.softmax(evidence.logits, 1).numpy(),
            prediction=prediction,
            conductance=conductance,
            cond_score=cond_score,
            lcr=lcr,
            unified_score=unified,
            reject=point.reject(unified),
            signal_set=chosen.name,
            operating_point=point,
            seconds=seconds,
            mutants_used=evidence.mutants_used.numpy() if evidence.mutants_used is not None else None,
        )


# ------------------------------------------------------------------------------------- loading
def load_conductance(bundle: Bundle, model: nn.Module) -> ShortcutConductance | LayerConductance:
    """The conductance computation the bundle recorded: the proven shortcut, or the general form."""
    info = bundle.get("conductance") or {}
    if "mode" not in info:
        raise BundleError("bundle has no conductance section with a mode (the conductance stage did not run)")
    layer = info["layer"]
    if info["mode"] == "shortcut":
        return ShortcutConductance.from_state(model, layer, bundle.read_tensors(CONDUCTANCE_FILE))
    if info["mode"] == "general":
        return LayerConductance(model, layer, n_steps=int(info["n_steps"]), rule=info["rule"])
    raise BundleError(f"unknown conductance mode {info['mode']!r} in the manifest")


def load_mutants(bundle: Bundle, model: nn.Module, *, verify: bool = True) -> MutantSet:
    """The kept mutants; with ``verify``, regenerated weights must hash as recorded at build time."""
    mutants = MutantSet.from_dict(bundle.read_json(MUTANTS_FILE))
    if verify:
        hashes = bundle.get("mutants", {}).get("weight_hashes", [])
        if len(hashes) != len(mutants.specs):
            raise BundleError(
                f"{MUTANTS_FILE}: {len(mutants.specs)} mutants but {len(hashes)} recorded hashes"
            )
        for i, (spec, expected) in enumerate(zip(mutants.specs, hashes, strict=True)):
            if mutant_weights_hash(model, spec) != expected:
                raise BundleError(
                    f"{MUTANTS_FILE}: mutant {i} (seed {spec.seed}) does not regenerate the weights "
                    "recorded at build time"
                )
    return mutants


def load_early_stopping(bundle: Bundle) -> EarlyStopping | None:
    """The bundle's early-stopping LCR setting (``lcr.early_stopping``), or None for the full LCR."""
    setting = (bundle.get("lcr") or {}).get("early_stopping")
    if setting is None:
        return None
    if not bundle.has_file(MUTANTS_FILE):
        raise BundleError("the manifest asks for early-stopping LCR but the bundle has no mutants")
    try:
        return EarlyStopping.from_dict(setting)
    except ConfigError as exc:
        raise BundleError(f"manifest lcr.early_stopping: {exc}") from exc


def load_detector(bundle: Bundle, stem: str) -> Any:
    return load_state(*bundle.read_detector_state(stem))


BACKENDS = ("torch", "onnx")


def load_extractor(
    bundle: Bundle,
    device: str | torch.device = "cpu",
    chunk_size: int = 32,
    *,
    backend: str = "torch",
    threads: int | None = None,
) -> EvidenceExtractor:
    """The bundle's extractor; ``backend="onnx"`` runs the forward, the shortcut conductance and the
    mutants on ONNX Runtime graphs exported now (see :mod:`models.onnx_backend`), with ``threads``
    intra-op threads (None: ORT's default)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
    if backend == "onnx":
        torch_extractor = load_extractor(bundle, device, chunk_size)
        return onnx_extractor(torch_extractor, threads=threads, device=device, input_shape=bundle.input_shape)
    model = bundle.load_model(device)
    conductance = load_conductance(bundle, model)
    ensemble: MutantEnsemble | PrefixSharingEnsemble | None = None
    if bundle.has_file(MUTANTS_FILE):
        specs = load_mutants(bundle, model).specs
        modules = (bundle.get("mutants") or {}).get("modules")
        if modules:  # mutants confined to later modules share the unmutated prefix
            ensemble = PrefixSharingEnsemble(model, specs, modules[0] if len(modules) == 1 else None)
        else:
            ensemble = MutantEnsemble(model, specs, chunk_size=chunk_size)
    return EvidenceExtractor(model, conductance, ensemble, load_early_stopping(bundle))


def load_gate(
    bundle: Bundle,
    device: str | torch.device = "cpu",
    default_set: str | None = None,
    *,
    backend: str = "torch",
    threads: int | None = None,
) -> Gate:
    """The whole gate of a finished bundle; ``default_set`` overrides the manifest's choice;
    ``backend`` (``"torch"`` or ``"onnx"``) and ``threads`` as in :func:`load_extractor`."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
    detectors = bundle.detectors
    if detectors is None:
        raise BundleError("bundle has no detectors section: build it to the end (predgate build)")
    extractor = load_extractor(bundle, device, backend=backend, threads=threads)
    cond_detector = load_detector(bundle, detectors.conductance.stem)
    cond_inputs = detectors.conductance.inputs
    try:
        check_cond_inputs(cond_inputs)
    except ConfigError as exc:
        raise BundleError(f"manifest detectors.conductance.inputs: {exc}") from exc
    num_classes = int(bundle.manifest["architecture"]["num_classes"])
    if cond_inputs == "conductance+class" and cond_detector.n_features_in_ <= num_classes:
        raise BundleError(
            f"the conductance detector reads {cond_detector.n_features_in_} inputs: too few for "
            f"conductance followed by a {num_classes}-class one-hot"
        )
    sets: dict[str, SignalSet] = {}
    for name, info in detectors.signal_sets.items():
        points = {k: OperatingPoint.from_dict(v) for k, v in info.operating_points.items()}
        sets[name] = SignalSet(
            name=name,
            signals=check_signals(info.signals),
            classifier=load_detector(bundle, info.stem),
            operating_points=points,
            default_point=info.default_point,
            cond_detector=load_detector(bundle, info.details["cond_detector_stem"])
            if info.details.get("cond_detector_stem")
            else None,
        )
    open_world = None
    if any(sig in OPEN_WORLD_SIGNALS for s in sets.values() for sig in s.signals):
        # The torch model whose forward the probe reads; the ONNX backend's forward is a graph, so
        # there the probe runs its own (torch) forward pass.
        model = extractor.model if backend == "torch" else bundle.load_model(device)
        open_world = OpenWorldProbe(OpenWorldScorers.load(bundle), model, tuple(bundle.normalisation.std))
    return Gate(
        extractor,
        cond_detector,
        sets,
        default_set or detectors.default_set,
        cond_inputs,
        num_classes,
        open_world,
    )

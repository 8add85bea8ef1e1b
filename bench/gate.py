"""``python -m bench.gate``: what each stage of the gate costs, against the naive reference.

Every stage runs on the same normalised images at each batch size; times are medians of repeated
calls and are also given in forward-equivalents (over one plain torch forward pass of the same batch,
timed in the same run: the machine is shared and noisy, so ratios are what travel). Two units: the
median of all forwards of the batch (``x fwd``), and the median of the forwards timed right next to
the stage's own calls, interleaved forward, stage, forward, ... (``x fwd (adj)``), which load that
drifts during a long run cannot skew; the FLOP-floor verdict uses the latter. The ``*_onnx`` stages
do the work of ``forward``, ``lcr_auto``, ``gate_default`` and ``gate_full`` through the ONNX Runtime
backend (:mod:`models.onnx_backend`), in the same units (``--no-onnx`` skips them). The naive reference is
what a first implementation would do: captum's ``LayerConductance`` (11 points, plus the forward pass
that finds its target) and every mutant evaluated by loading its weights into a model copy.

Peak memory is measured per stage and batch size in a fresh subprocess, because ``tracemalloc`` does
not see torch's allocations and a process's high-water mark never goes down: the child loads the
bundle and the inputs, reads its peak resident set size, runs the stage once and reports how far the
peak rose (on CUDA: the rise of ``torch.cuda.max_memory_allocated`` instead).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import finish, peak_rss_bytes
from models.architectures import resolve_layer
from models.bundle import Bundle, load_bundle
from models.conductance import LayerConductance, ShortcutConductance
from models.costs import flop_floor, forward_equivalents, sequential_lcr_call, timed_runs
from models.data import load_splits
from models.evidence import EvidenceExtractor
from models.gate import Gate, load_extractor, load_gate
from models.lcr import MutantEnsemble, predict_naive
from models.progress import maybe_tqdm, progress_wanted
from models.signals import OPEN_WORLD_SIGNALS, PAPER_SET, needs_conductance, needs_lcr, signal_matrix

# Stage names in table order. "gate_full" computes every signal (conductance and LCR) whatever the
# set needs: it is the gated prediction the FLOP floor is about. The naive reference has no detector
# of its own; "naive_gate" is naive conductance + naive LCR + the detectors stage.
STAGES = (
    "forward",
    "conductance_general",
    "conductance_shortcut",
    "lcr_auto",
    "lcr_vmap",
    "lcr_loop",
    "lcr_sequential",
    "detectors",
    "gate_default",
    "gate_full",
    "gate_cheapest",
    "naive_conductance",
    "naive_lcr",
    "forward_onnx",
    "lcr_onnx",
    "gate_onnx_default",
    "gate_onnx_full",
)
NAIVE_STAGES = ("naive_conductance", "naive_lcr")
ONNX_STAGES = ("forward_onnx", "lcr_onnx", "gate_onnx_default", "gate_onnx_full")
DEFAULT_BATCH_SIZES = (1, 8, 64)


# ------------------------------------------------------------------------------------------ inputs
def sample_images(bundle: Bundle, n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """``n`` raw images (``N x H x W x C`` uint8) and where they came from.

    Real validation images when the bundle's data can be reloaded (repeated when val is smaller than
    ``n``); uniform random pixels of the bundle's input shape otherwise, which cost the same to
    compute but make LCR and the detectors see unusual inputs.
    """
    try:
        images = load_splits(bundle)["val"].images
        if len(images):
            reps = -(-n // len(images))
            return np.concatenate([images] * reps)[:n], "val images"
    except Exception as exc:  # noqa: BLE001 - any failure to reload data falls back to random pixels
        print(
            f"bench: could not reload the bundle's val images ({exc}); using random pixels", file=sys.stderr
        )
    c, h, w = bundle.input_shape
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8), "random pixels"


# ------------------------------------------------------------------------------------------ stages
@dataclass
class Subject:
    """A loaded bundle with everything the stages call."""

    bundle: Bundle
    extractor: EvidenceExtractor
    gate: Gate | None
    device: torch.device
    onnx_extractor: EvidenceExtractor | None = None
    onnx_gate: Gate | None = None

    @property
    def n_mutants(self) -> int:
        return len(self.extractor.ensemble) if self.extractor.ensemble is not None else 0

    @property
    def conductance_mode(self) -> str:
        return "shortcut" if isinstance(self.extractor.conductance, ShortcutConductance) else "general"

    def cheapest_set(self) -> str | None:
        """The signal set needing neither conductance nor LCR (``msp`` when the bundle has it)."""
        if self.gate is None:
            return None
        sets = self.gate.signal_sets
        if "msp" in sets:
            return "msp"
        cost = {n: needs_conductance(s.signals) + 10 * needs_lcr(s.signals) for n, s in sets.items()}
        return min(sorted(cost), key=cost.__getitem__)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def onnx_unavailable() -> str | None:
    """Why the ONNX stages cannot run here (the exporter needs the ``onnx`` package), or None."""
    import importlib.util

    return None if importlib.util.find_spec("onnx") else "the 'onnx' package is not installed"


def load_subject(
    bundle_path: str | Path, device: str = "cpu", *, onnx: bool = False, threads: int | None = None
) -> Subject:
    """The bundle's gate on torch and, with ``onnx``, also on ONNX Runtime (``threads`` intra-op threads)."""
    bundle = load_bundle(bundle_path)
    dev = torch.device(device)
    gate = load_gate(bundle, dev) if bundle.get("detectors") else None
    extractor = gate.extractor if gate is not None else load_extractor(bundle, dev)
    subject = Subject(bundle, extractor, gate, dev)
    if onnx:
        if gate is not None:
            subject.onnx_gate = load_gate(bundle, dev, backend="onnx", threads=threads)
            subject.onnx_extractor = subject.onnx_gate.extractor
        else:
            subject.onnx_extractor = load_extractor(bundle, dev, backend="onnx", threads=threads)
    return subject


def _general_conductance(subject: Subject) -> LayerConductance:
    info = subject.bundle.get("conductance") or {}
    model = subject.extractor.model
    return LayerConductance(
        model, info["layer"], n_steps=int(info.get("n_steps", 10)), rule=info.get("rule", "left")
    )


def _naive_conductance(subject: Subject, x: torch.Tensor) -> Callable[[], object]:
    """Captum's 11-point conductance; it needs the target first, hence one extra forward."""
    from captum.attr import LayerConductance as CaptumLayerConductance  # optional (dev extra): lazily

    info = subject.bundle.get("conductance") or {}
    model = subject.extractor.model
    captum = CaptumLayerConductance(model, resolve_layer(model, info["layer"]))
    n_steps = int(info.get("n_steps", 10))

    def run() -> torch.Tensor:
        with torch.no_grad():
            target = model(x).argmax(1)
        attr = captum.attribute(x, target=target, n_steps=n_steps, method="riemann_trapezoid")
        return attr.reshape(attr.shape[0], attr.shape[1], -1).sum(2)

    return run


def _detectors(subject: Subject, x: torch.Tensor) -> Callable[[], object]:
    """The default set's detectors on evidence computed beforehand (same steps as ``Gate.run``)."""
    assert subject.gate is not None
    gate = subject.gate
    chosen = gate.signal_set(None)
    if any(
        sig in OPEN_WORLD_SIGNALS for sig in chosen.signals
    ):  # their columns need the probe: time the paper's
        chosen = gate.signal_set(PAPER_SET)
    evidence = subject.extractor(x, conductance=True, lcr=subject.n_mutants > 0)
    logits = evidence.logits.numpy()
    lcr = evidence.lcr.numpy() if evidence.lcr is not None else None
    cond = evidence.conductance.double().numpy() if evidence.conductance is not None else None
    prediction = evidence.prediction.numpy()

    def run() -> np.ndarray:
        cond_score = None
        if cond is not None and gate.cond_detector is not None:
            cond_score = gate.cond_score(cond, prediction, chosen)
        return chosen.classifier.decision_function(signal_matrix(chosen.signals, logits, cond_score, lcr))

    return run


def stage_factories(subject: Subject, x: torch.Tensor) -> dict[str, Callable[[], Callable[[], object]]]:
    """Per available stage, a function that does its set-up and returns the call to time.

    Set-up is kept out of the timed call and out of the memory baseline's reach only where the
    serving path would also have it ready (evidence for the detectors stage); lazily built state of
    the stage itself (vmap's stacked weights) is built by the warm-up call.
    """
    model, ensemble, gate = subject.extractor.model, subject.extractor.ensemble, subject.gate

    def forward() -> object:
        with torch.no_grad():
            return model(x)

    out: dict[str, Callable[[], Callable[[], object]]] = {"forward": lambda: forward}
    general = _general_conductance(subject)
    out["conductance_general"] = lambda: lambda: general.attribute(x)
    if isinstance(subject.extractor.conductance, ShortcutConductance):
        shortcut = subject.extractor.conductance
        out["conductance_shortcut"] = lambda: lambda: shortcut.attribute(x)
    if isinstance(ensemble, MutantEnsemble):
        for strategy in ("auto", "vmap", "loop"):
            out[f"lcr_{strategy}"] = lambda s=strategy: lambda: ensemble.predict(x, strategy=s)
    elif ensemble is not None:  # mutants confined to later modules: one strategy, the shared prefix
        out["lcr_auto"] = lambda: lambda: ensemble.predict(x)
    if subject.extractor.early_stopping is not None:  # what the gate runs: chunks until settled
        out["lcr_sequential"] = lambda: sequential_lcr_call(subject.extractor, x)
    if gate is not None:
        out["detectors"] = lambda: _detectors(subject, x)
        out["gate_default"] = lambda: lambda: gate.run(x)
        out["gate_full"] = lambda: lambda: gate.run(x, full_evidence=True)
        cheapest = subject.cheapest_set()
        out["gate_cheapest"] = lambda: lambda: gate.run(x, signal_set=cheapest)
    out["naive_conductance"] = lambda: _naive_conductance(subject, x)
    if ensemble is not None:
        specs = ensemble.specs
        out["naive_lcr"] = lambda: lambda: predict_naive(model, specs, x)
    onnx = subject.onnx_extractor
    if onnx is not None:

        def forward_onnx() -> object:  # the ORT graph; outputs the conductance layer too where it is read
            return onnx.forward(x)

        out["forward_onnx"] = lambda: forward_onnx
        if onnx.ensemble is not None:
            onnx_ensemble = onnx.ensemble
            out["lcr_onnx"] = lambda: lambda: onnx_ensemble.predict(x)
    onnx_gate = subject.onnx_gate
    if onnx_gate is not None:
        out["gate_onnx_default"] = lambda: lambda: onnx_gate.run(x)
        out["gate_onnx_full"] = lambda: lambda: onnx_gate.run(x, full_evidence=True)
    return out


# ------------------------------------------------------------------------------------------ memory
def _probe(bundle_path: str, stage: str, inputs: str, device: str, threads: int = 1) -> dict[str, Any]:
    """Child side of :func:`probe_memory`: load, note the peak, run the stage once, report the rise."""
    subject = load_subject(bundle_path, device, onnx=stage in ONNX_STAGES, threads=threads)
    x = torch.load(inputs).to(subject.device)
    run = stage_factories(subject, x)[stage]()
    gc.collect()
    if subject.device.type == "cuda":
        subject.synchronize()
        torch.cuda.reset_peak_memory_stats(subject.device)
        before = torch.cuda.memory_allocated(subject.device)
        run()
        subject.synchronize()
        return {
            "kind": "cuda_max_allocated",
            "extra_bytes": torch.cuda.max_memory_allocated(subject.device) - before,
        }
    before = peak_rss_bytes()
    run()
    return {"kind": "cpu_peak_rss", "extra_bytes": peak_rss_bytes() - before, "baseline_bytes": before}


def probe_memory(
    bundle_path: str | Path, stage: str, x: torch.Tensor, device: str = "cpu", threads: int = 1
) -> dict[str, Any]:
    """Peak memory one call of ``stage`` adds over a process that has loaded the bundle and ``x``.

    Runs in a fresh ``python -m bench.gate`` child so that earlier stages cannot have raised the
    high-water mark already. Returns ``{"kind", "extra_bytes", ...}``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "x.pt"
        torch.save(x.cpu(), inputs)
        cmd = [
            sys.executable,
            "-m",
            "bench.gate",
            "--bundle",
            str(bundle_path),
            "--device",
            device,
            "--threads",
            str(threads),
            "--probe-stage",
            stage,
            "--probe-inputs",
            str(inputs),
        ]
        done = subprocess.run(
            cmd, capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1]
        )
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for {stage} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ timing
def interleaved_runs(
    stage: Callable[[], object],
    forward: Callable[[], object],
    repeats: int,
    warmup: int,
    synchronize: Callable[[], None],
) -> tuple[list[float], list[float]]:
    """``(stage seconds, adjacent forward seconds)``: forward, stage, forward, ..., stage, forward.

    Each stage call sits between two forwards, so the median of those forwards is the unit at the
    moment the stage ran, whatever the machine's load did earlier or later in the benchmark.
    """
    for _ in range(warmup):
        stage()
    forwards = timed_runs(forward, 1, warmup=0, synchronize=synchronize)
    runs: list[float] = []
    for _ in range(repeats):
        runs += timed_runs(stage, 1, warmup=0, synchronize=synchronize)
        forwards += timed_runs(forward, 1, warmup=0, synchronize=synchronize)
    return runs, forwards


def measure_batch(
    subject: Subject,
    x: torch.Tensor,
    repeats: int,
    *,
    memory: bool,
    bundle_path: str | Path,
    threads: int,
    progress: bool = False,
) -> dict[str, Any]:
    """Every available stage on ``x``: median seconds, ms per image, forward-equivalents, memory.

    The plain forward is timed before and after the other stages; its median over both sets of
    runs is the unit of ``forward_equivalents``. Each stage's calls are also interleaved with
    forwards (:func:`interleaved_runs`), the unit of ``forward_equivalents_adjacent``.
    """
    n = x.shape[0]
    factories = stage_factories(subject, x)
    sync = subject.synchronize
    forward = factories["forward"]()
    forward_runs = timed_runs(forward, repeats, warmup=2, synchronize=sync)
    samples: dict[str, list[float]] = {}
    adjacent: dict[str, list[float]] = {}
    names = [s for s in STAGES if s in factories and s != "forward"]
    for name in maybe_tqdm(names, progress, f"stages, batch {n}", leave=False):
        run = factories[name]()
        # The naive reference rebuilds its state on every call: a warm-up call would only add time.
        warmup = 0 if name in NAIVE_STAGES else 1
        samples[name], adjacent[name] = interleaved_runs(run, forward, repeats, warmup, sync)
        del run
    forward_runs += timed_runs(forward, repeats, warmup=0, synchronize=sync)
    samples = {"forward": forward_runs, **samples}
    adjacent["forward"] = forward_runs
    unit = statistics.median(forward_runs)
    stages: dict[str, Any] = {}
    for name, runs in samples.items():
        seconds = statistics.median(runs)
        adjacent_unit = statistics.median(adjacent[name])
        stages[name] = {
            "seconds": seconds,
            "runs_s": runs,
            "ms_per_image": 1000.0 * seconds / n,
            "forward_equivalents": forward_equivalents(seconds, unit),
            "adjacent_forward_s": adjacent_unit,
            "forward_equivalents_adjacent": forward_equivalents(seconds, adjacent_unit),
        }
    if "naive_conductance" in stages and "naive_lcr" in stages and "detectors" in stages:
        parts = [stages[s] for s in ("naive_conductance", "naive_lcr", "detectors")]
        seconds = sum(p["seconds"] for p in parts)
        stages["naive_gate"] = {
            "seconds": seconds,
            "runs_s": None,
            "ms_per_image": 1000.0 * seconds / n,
            "forward_equivalents": forward_equivalents(seconds, unit),
            "forward_equivalents_adjacent": sum(p["forward_equivalents_adjacent"] for p in parts),
            "note": "sum of the medians of naive_conductance, naive_lcr and detectors "
            "(adjacent: the sum of their adjacent ratios)",
        }
    if memory:
        for name in maybe_tqdm(list(samples), progress, f"memory, batch {n}", leave=False):
            probe = probe_memory(bundle_path, name, x, str(subject.device), threads)
            stages[name]["peak_extra_mib"] = probe["extra_bytes"] / 2**20
            stages[name]["memory_kind"] = probe["kind"]
    return {"batch_size": n, "forward_seconds": unit, "stages": stages}


def targets(subject: Subject, per_batch: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The issue's explicit rows: whole gate vs the FLOP floor at the largest batch, and vs the naive
    reference at the smallest."""
    out: dict[str, Any] = {}
    sizes = sorted(per_batch)
    large = per_batch[sizes[-1]]["stages"]
    for key, stage in (("flop_floor", "gate_full"), ("flop_floor_onnx", "gate_onnx_full")):
        if subject.n_mutants and subject.conductance_mode == "shortcut" and stage in large:
            # forward-equivalents against forwards timed next to the stage: drift-free (see measure_batch)
            floor = flop_floor(subject.n_mutants)
            gate_fe = large[stage]["forward_equivalents_adjacent"]
            out[key] = {
                "batch_size": sizes[-1],
                "stage": stage,
                "floor_forward_equivalents": floor,
                "gate_full_forward_equivalents": gate_fe,
                "unit": "adjacent torch forward",
                "ratio_to_floor": gate_fe / floor,
                "target": "<= 1.2",
                "met": gate_fe / floor <= 1.2,
            }
        elif key == "flop_floor":
            out[key] = {"note": "no FLOP floor: the bundle has no mutants or no conductance shortcut"}
    small = per_batch[sizes[0]]["stages"]
    if "naive_gate" in small and "gate_full" in small:
        speedup = small["naive_gate"]["seconds"] / small["gate_full"]["seconds"]
        out["speedup_vs_naive"] = {
            "batch_size": sizes[0],
            "naive_gate_ms_per_image": small["naive_gate"]["ms_per_image"],
            "gate_full_ms_per_image": small["gate_full"]["ms_per_image"],
            "speedup": speedup,
            "target": ">= 10",
            "met": speedup >= 10,
        }
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def run_benchmark(
    bundle_path: str | Path,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    repeats: int = 3,
    *,
    memory: bool = True,
    device: str = "cpu",
    threads: int = 1,
    progress: bool = False,
    onnx: bool = True,
) -> dict[str, Any]:
    """Measure every stage at every batch size; the result is what ``--out`` writes.

    ``onnx`` adds the ONNX Runtime stages (ORT gets ``threads`` intra-op threads, as torch does)
    where the exporter can run; ``onnx_skipped`` in the result says why they are missing otherwise.
    """
    started = time.perf_counter()
    skipped = onnx_unavailable() if onnx else "--no-onnx"
    if onnx and skipped:
        print(f"bench: skipping the ONNX stages: {skipped}", file=sys.stderr)
    subject = load_subject(bundle_path, device, onnx=skipped is None, threads=threads)
    raw, source = sample_images(subject.bundle, max(batch_sizes))
    images = subject.bundle.normalisation.apply(raw).to(subject.device)
    per_batch = {
        n: measure_batch(
            subject,
            images[:n].contiguous(),
            repeats,
            memory=memory,
            bundle_path=bundle_path,
            threads=threads,
            progress=progress,
        )
        for n in sorted(set(batch_sizes))
    }
    return {
        "bundle": str(bundle_path),
        "bundle_id": subject.bundle.manifest.get("bundle_id"),
        "conductance_mode": subject.conductance_mode,
        "n_mutants": subject.n_mutants,
        "default_set": subject.gate.default_set if subject.gate else None,
        "cheapest_set": subject.cheapest_set(),
        "inputs": source,
        "repeats": repeats,
        "device": str(subject.device),
        "memory_measured": memory,
        "onnx_skipped": skipped,
        "machine": machine(),
        "batches": {str(n): r for n, r in per_batch.items()},
        "targets": targets(subject, per_batch),
        "wall_seconds": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------ output
def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"


def markdown(result: dict[str, Any]) -> str:
    """Stage table (ms per image, forward-equivalents, extra peak MiB per batch size) and targets."""
    sizes = list(result["batches"])
    head = ["stage"]
    for n in sizes:
        head += [f"bs {n} ms/img", f"bs {n} x fwd", f"bs {n} x fwd (adj)"]
        head += [f"bs {n} MiB"] if result["memory_measured"] else []
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    names = [s for s in (*STAGES, "naive_gate") if any(s in result["batches"][n]["stages"] for n in sizes)]
    for name in names:
        row = [name]
        for n in sizes:
            stage = result["batches"][n]["stages"].get(name, {})
            row += [
                _fmt(stage.get("ms_per_image")),
                _fmt(stage.get("forward_equivalents"), 1),
                _fmt(stage.get("forward_equivalents_adjacent"), 1),
            ]
            if result["memory_measured"]:
                row.append(_fmt(stage.get("peak_extra_mib"), 1))
        lines.append("| " + " | ".join(row) + " |")
    t = result["targets"]
    lines += ["", "| target | measured | goal | met |", "| --- | --- | --- | --- |"]
    floor = t.get("flop_floor", {})
    if "ratio_to_floor" in floor:
        lines.append(
            f"| FLOP floor (1 + {result['n_mutants']} mutants) | "
            f"{floor['floor_forward_equivalents']} forward-equivalents "
            f"| - | - |"
        )
        for key, what in (("flop_floor", "whole gate"), ("flop_floor_onnx", "whole gate on ONNX Runtime")):
            if key in t:
                f = t[key]
                lines.append(
                    f"| {what} (full evidence) at bs {f['batch_size']} / floor, x fwd (adj) | "
                    f"{_fmt(f['gate_full_forward_equivalents'], 1)} / {f['floor_forward_equivalents']} = "
                    f"{f['ratio_to_floor']:.2f} | {f['target']} | {'yes' if f['met'] else 'no'} |"
                )
    else:
        lines.append(f"| FLOP floor | {floor.get('note', 'n/a')} | <= 1.2 | n/a |")
    speed = t.get("speedup_vs_naive")
    if speed:
        lines.append(
            f"| whole gate vs naive reference at bs {speed['batch_size']} | "
            f"{_fmt(speed['naive_gate_ms_per_image'])} / {_fmt(speed['gate_full_ms_per_image'])} ms = "
            f"{speed['speedup']:.1f}x | {speed['target']} | {'yes' if speed['met'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.gate --bundle B [--batch-sizes 1 8 64] [--repeats 3] [--out result.json]``"""
    parser = argparse.ArgumentParser(prog="python -m bench.gate", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per stage (median reported)")
    parser.add_argument("--out", help="write the full result as JSON here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and ONNX Runtime intra-op threads (default 1: steadier on shared cores)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the per-stage memory subprocesses")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime stages")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--probe-stage", help=argparse.SUPPRESS)
    parser.add_argument("--probe-inputs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe_stage:
        print(json.dumps(_probe(args.bundle, args.probe_stage, args.probe_inputs, args.device, args.threads)))
        return 0
    if min(args.batch_sizes) < 1 or args.repeats < 1:
        parser.error("batch sizes and repeats must be >= 1")
    result = run_benchmark(
        args.bundle,
        args.batch_sizes,
        args.repeats,
        memory=not args.no_memory,
        device=args.device,
        threads=args.threads,
        progress=progress_wanted(args.no_progress),
        onnx=not args.no_onnx,
    )
    return finish(result, "bench.gate", argv, args.out, markdown)


if __name__ == "__main__":
    sys.exit(main())

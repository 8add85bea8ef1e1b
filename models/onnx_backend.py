"""ONNX Runtime backend for the gate's forward pass and its mutant ensemble.

Two kinds of exported graph, each run by an ``onnxruntime.InferenceSession`` (numpy inside,
torch tensors at the boundary):

* the CNN itself, with the logits and, optionally, the conductance layer's activation as outputs
  (:class:`OnnxForward`): with the bundle's stored constants this is all that
  :class:`models.conductance.ShortcutConductance` needs, so the closed form runs unchanged on top;
* the mutant ensemble with the mutants stacked (:class:`OnnxMutantEnsemble`): one graph per chunk
  of mutants maps ``N`` images to the ``chunk x N`` labels of every mutant of the chunk. It is
  built with ``torch.fx`` from the eval model: values that no mutated conv influences are computed
  once for the ``N`` images, and repeated per mutant (``chunk * N`` rows, mutant-major) where they
  first meet a mutated value; every mutated conv becomes one grouped conv over the chunk's stacked
  weights (``(chunk * N, C, H, W) -> (N, chunk * C, H, W)``, ``groups = chunk * conv.groups``);
  every other layer runs on the ``chunk * N`` rows unchanged (eval BatchNorm, ReLU, add, pooling,
  flatten and linear all act row by row). Mutants confined to late modules (``layer3``) thereby
  share the unmutated prefix without a separate split.

Both exports go through ``torch.onnx.export(..., dynamo=False)``, which needs the ``onnx`` package
(not only ``onnxruntime``). Graphs are exported per input image shape, on first use or eagerly with
``input_shape``; only the batch axis is dynamic.

:func:`onnx_extractor` turns a torch :class:`models.evidence.EvidenceExtractor` into one whose forward
pass, shortcut conductance and LCR run on ONNX Runtime; the general 11-point conductance needs
autograd and stays on torch.
"""

from __future__ import annotations

import copy
import io
import logging
import threading
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from models.architectures import check_eval, resolve_layer
from models.conductance import LayerConductance, ShortcutConductance
from models.errors import ConfigError, InputError
from models.evidence import EvidenceExtractor
from models.mutation import MutantSpec, mutant_patches
from models.sequential_lcr import EarlyStopping, SequentialLCR

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

OPSET = 17
DEVICES = ("cpu", "cuda")
# Batch size of the example input used for tracing: > 1, so that nothing specialises on a batch of one.
_EXAMPLE_BATCH = 2

__all__ = [
    "OnnxForward",
    "OnnxMutantEnsemble",
    "export_forward",
    "export_stacked_mutants",
    "onnx_extractor",
    "stack_mutants",
]


# ------------------------------------------------------------------------------------- plumbing
def _require_onnx() -> None:
    """``torch.onnx.export`` writes its graph through the ``onnx`` package even with ``dynamo=False``."""
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "the ONNX backend exports graphs with torch.onnx, which needs the 'onnx' package; install it "
            "(pip install onnx) or use the torch backend"
        ) from exc


def _check_images(x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise InputError(f"expected a float N x C x H x W tensor, got {getattr(x, 'shape', type(x))}")
    return x


def _device_name(device: str | torch.device) -> str:
    try:
        name = torch.device(device).type
    except (RuntimeError, TypeError):
        name = str(device)
    if name not in DEVICES:
        raise ConfigError(f"unknown ONNX Runtime device {str(device)!r}; valid: {list(DEVICES)}")
    return name


def providers_for(device: str | torch.device) -> list[str]:
    """Execution providers for ``device``: CUDA first where asked for and installed, CPU otherwise.

    The CPU ``onnxruntime`` wheel has no CUDA provider (``onnxruntime-gpu`` does); asking for CUDA
    without it falls back to the CPU with a warning rather than failing a server start.
    """
    import onnxruntime as ort  # heavy, loaded only when the ONNX backend is used

    if _device_name(device) == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.warning("ONNX Runtime has no CUDA provider here (install onnxruntime-gpu); running on the CPU")
    return ["CPUExecutionProvider"]


def make_session(
    model_bytes: bytes, *, threads: int | None = None, device: str = "cpu"
) -> ort.InferenceSession:
    """An inference session over a serialised graph; ``threads`` sets ORT's intra-op pool (None:
    ORT's default)."""
    import onnxruntime as ort  # heavy, loaded only when the ONNX backend is used

    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, options, providers=providers_for(device))


def _export(
    module: nn.Module,
    example: torch.Tensor,
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> bytes:
    """Serialised ONNX graph of ``module`` traced on ``example`` (input name ``x``, batch axis dynamic)."""
    _require_onnx()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter warns that it is deprecated and about traced shape arithmetic;
        # the tests compare every exported graph with torch at other batch sizes instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=["x"],
            output_names=output_names,
            dynamic_axes={"x": {0: "n"}, **dynamic_axes},
            do_constant_folding=True,
        )
    return buffer.getvalue()


def _example(input_shape: Sequence[int]) -> torch.Tensor:
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    return torch.randn((_EXAMPLE_BATCH, *shape), generator=torch.Generator().manual_seed(0))


def _private_copy(model: nn.Module) -> nn.Module:
    """A CPU eval copy, so that later changes to ``model`` cannot leak into graphs exported on demand."""
    check_eval(model, "the ONNX export")
    return copy.deepcopy(model).cpu().eval().requires_grad_(False)


class _SessionCache:
    """One session per input image shape, built on first use (thread-safe)."""

    def __init__(self, build: object) -> None:
        self._build = build
        self._sessions: dict[tuple[int, ...], object] = {}
        self._lock = threading.Lock()

    def get(self, input_shape: Sequence[int]) -> object:
        key = tuple(int(v) for v in input_shape)
        session = self._sessions.get(key)
        if session is None:
            with self._lock:
                session = self._sessions.get(key)
                if session is None:
                    session = self._build(key)  # type: ignore[operator]
                    self._sessions[key] = session
        return session

    def __len__(self) -> int:
        return len(self._sessions)


# ------------------------------------------------------------------------------------- forward
class _WithActivation(nn.Module):
    """The model with the layer's output as a second output (read by a hook while tracing)."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        self.model = model
        self.layer_name = layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []
        handle = resolve_layer(self.model, self.layer_name).register_forward_hook(
            lambda module, inputs, output: seen.append(output)
        )
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if len(seen) != 1 or not isinstance(seen[0], torch.Tensor):
            raise ConfigError(
                f"layer {self.layer_name!r} must produce one tensor in one call per forward pass"
            )
        return logits, seen[0]


def export_forward(model: nn.Module, input_shape: Sequence[int], layer: str | None = None) -> bytes:
    """ONNX graph of the eval ``model``: input ``x`` (``N x C x H x W``), outputs ``logits`` (``N x K``)
    and, with ``layer``, ``activation`` (that module's output, ``N x C_layer x h x w``)."""
    model = _private_copy(model)
    if layer is None:
        return _export(model, _example(input_shape), ["logits"], {"logits": {0: "n"}})
    resolve_layer(model, layer)
    return _export(
        _WithActivation(model, layer),
        _example(input_shape),
        ["logits", "activation"],
        {"logits": {0: "n"}, "activation": {0: "n"}},
    )


class OnnxForward:
    """The CNN's forward pass on ONNX Runtime.

    Parameters
    ----------
    model : eval-mode CNN; a private copy is exported, per input image shape.
    layer : module whose output is returned as well (the conductance layer), or None.
    input_shape : ``(C, H, W)`` to export for right away; other shapes are exported on first use.
    threads : ORT intra-op threads (None: ORT's default, every core).
    device : ``"cpu"`` or ``"cuda"`` (CUDA provider when installed, else the CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        threads: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = _private_copy(model)
        if layer is not None:
            resolve_layer(self.model, layer)
        self.layer = layer
        self.threads = threads
        self.device = _device_name(device)
        self._sessions = _SessionCache(self._build)
        if input_shape is not None:
            self._sessions.get(input_shape)

    def _build(self, input_shape: tuple[int, ...]) -> object:
        return make_session(
            export_forward(self.model, input_shape, self.layer), threads=self.threads, device=self.device
        )

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits N x K, activation N x C_layer x h x w or None)`` as CPU float32 tensors."""
        x = _check_images(x)
        if len(x) == 0:
            raise InputError("expected at least one image")
        session = self._sessions.get(x.shape[1:])
        feed = {"x": x.detach().to("cpu", torch.float32).contiguous().numpy()}
        outputs = session.run(None, feed)  # type: ignore[attr-defined]
        logits = torch.from_numpy(outputs[0])
        return logits, (torch.from_numpy(outputs[1]) if self.layer is not None else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``N x K`` (CPU float32)."""
        return self.run(x)[0]


# ------------------------------------------------------------------------------------- stacked mutants
def _repeat_rows(t: torch.Tensor, m: int) -> torch.Tensor:
    """``N x ...`` -> ``m * N x ...``, mutant-major (rows ``j * N .. (j + 1) * N - 1`` are mutant ``j``'s)."""
    return t.repeat(m, *([1] * (t.ndim - 1)))


def _repeat_channels(t: torch.Tensor, m: int) -> torch.Tensor:
    """An unmutated ``N x C x H x W`` input as the channel-stacked ``N x m*C x H x W`` of ``m`` mutants."""
    return t.repeat(1, m, 1, 1)


def _to_channel_stack(t: torch.Tensor, m: int) -> torch.Tensor:
    """``m*N x C x H x W`` (mutant-major rows) -> ``N x m*C x H x W`` (mutant-major channel groups)."""
    return t.unflatten(0, (m, -1)).transpose(0, 1).flatten(1, 2)


def _from_channel_stack(t: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of :func:`_to_channel_stack`."""
    return t.unflatten(1, (m, -1)).transpose(0, 1).flatten(0, 1)


def _labels(logits: torch.Tensor, m: int) -> torch.Tensor:
    """``m*N x K`` logits -> ``m x N`` int64 labels."""
    return logits.argmax(1).reshape(m, -1)


class StackedConv(nn.Module):
    """One conv of ``m`` mutants as a grouped conv over their stacked weights.

    Input ``N x m*C_in x H x W``, output ``N x m*C_out x H' x W'`` (channel group ``j`` is mutant ``j``).

    Parameters
    ----------
    conv : the original conv (stride, padding, dilation, groups are taken from it).
    weights : ``m x C_out x C_in/groups x kh x kw``, each mutant's weight.
    biases : ``m x C_out`` or None.
    """

    def __init__(self, conv: nn.Conv2d, weights: torch.Tensor, biases: torch.Tensor | None) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ConfigError(
                f"stacked mutants support zero-padded convs only, not padding_mode={conv.padding_mode!r}"
            )
        self.m = int(weights.shape[0])
        self.weight = nn.Parameter(weights.flatten(0, 1).contiguous(), requires_grad=False)
        self.bias = (
            None if biases is None else nn.Parameter(biases.flatten().contiguous(), requires_grad=False)
        )
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups * self.m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _stacked_conv(model: nn.Module, name: str, specs_patches: list[dict]) -> StackedConv:
    conv = model.get_submodule(name)
    per_attr: dict[str, list[torch.Tensor]] = {"weight": [], "bias": []}
    for patches in specs_patches:
        for attr in ("weight", "bias"):
            original = getattr(conv, attr)
            if original is None:
                continue
            tensor = original.detach().clone()
            key = f"{name}.{attr}" if name else attr
            if key in patches:
                index, rows = patches[key]
                tensor.index_copy_(0, index.cpu(), rows.cpu())
            per_attr[attr].append(tensor)
    biases = torch.stack(per_attr["bias"]) if conv.bias is not None else None
    return StackedConv(conv, torch.stack(per_attr["weight"]), biases)


def _depends_on_input(graph: fx.Graph) -> set[fx.Node]:
    out: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def _dirty(graph: fx.Graph, touched: set[str], roots: set[fx.Node]) -> set[fx.Node]:
    """Nodes whose value differs between mutants: the touched convs, ``roots`` and all they feed."""
    dirty: set[fx.Node] = set()
    for node in graph.nodes:
        seeded = node in roots or (node.op == "call_module" and str(node.target) in touched)
        if seeded or any(a in dirty for a in node.all_input_nodes):
            dirty.add(node)
    return dirty


def stack_mutants(
    model: nn.Module, specs: Sequence[MutantSpec], input_shape: Sequence[int]
) -> fx.GraphModule:
    """A torch module mapping ``N x C x H x W`` images to the ``M x N`` int64 labels of ``specs``.

    See the module docstring for the construction; ``input_shape`` ``(C, H, W)`` is used to find
    which values cross from the shared part into the per-mutant part as batch-first tensors. When a
    value crosses that is not one (e.g. a batch size read off an unmutated activation), the images
    are repeated at the input instead, which is always correct.
    """
    model = _private_copy(model)
    if not specs:
        raise ConfigError("a mutant ensemble needs at least one mutant")
    m = len(specs)
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds on untraceable control flow
        raise ConfigError(f"cannot stack mutants of {type(model).__name__}: torch.fx failed ({exc})") from exc
    graph = traced.graph
    patches = [mutant_patches(model, spec) for spec in specs]
    touched = {name for spec in specs for name, _ in spec.filters}
    modules = dict(traced.named_modules())
    called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    for name in sorted(touched):
        if name not in called or not isinstance(modules.get(name), nn.Conv2d):
            raise ConfigError(
                f"mutated conv {name!r} is not called as an nn.Conv2d module in the traced graph"
            )
    for node in graph.nodes:
        if node.op == "get_attr" and any(str(node.target).startswith(f"{name}.") for name in touched):
            raise ConfigError(f"the traced graph reads a mutated conv's parameter directly ({node.target})")
        if node.op == "call_module" and str(node.target) in touched and (len(node.args) != 1 or node.kwargs):
            raise ConfigError(f"mutated conv {node.target!r} must be called with one input")

    from torch.fx.passes.shape_prop import ShapeProp

    example = _example(input_shape)
    ShapeProp(traced).propagate(example)
    varying = _depends_on_input(graph)

    def batch_first(node: fx.Node) -> bool:
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        return shape is not None and len(shape) >= 1 and shape[0] == _EXAMPLE_BATCH

    placeholders = {n for n in graph.nodes if n.op == "placeholder"}
    dirty = _dirty(graph, touched, set())
    crossing = {a for n in dirty for a in n.all_input_nodes if a not in dirty and a in varying}
    if not all(batch_first(a) for a in crossing):
        dirty = _dirty(graph, touched, placeholders)  # repeat the images themselves
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    if not isinstance(result, fx.Node):
        raise ConfigError("stacked mutants need a model that returns one logits tensor")

    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    repeated: dict[fx.Node, fx.Node] = {}
    root: dict[str, object] = {}

    def shared(node: fx.Node) -> fx.Node:
        """A value as the consumer sees it: per-mutant rows when it varies with the input."""
        if node in dirty or node not in varying:
            return env[node]
        if node not in repeated:
            repeated[node] = new.call_function(_repeat_rows, (env[node], m))
        return repeated[node]

    for node in graph.nodes:
        if node.op == "output":
            continue
        if node in placeholders and node in dirty:
            env[node] = new.node_copy(node, lambda n: env[n])
            env[node] = new.call_function(_repeat_rows, (env[node], m))
        elif node.op == "call_module" and str(node.target) in touched:
            (source,) = node.args
            assert isinstance(source, fx.Node)
            stack = _to_channel_stack if source in dirty else _repeat_channels
            target = f"stacked_{len([k for k in root if k.startswith('stacked_')])}"
            root[target] = _stacked_conv(model, str(node.target), patches)
            grouped = new.call_module(target, (new.call_function(stack, (env[source], m)),))
            env[node] = new.call_function(_from_channel_stack, (grouped, m))
        elif node in dirty:
            env[node] = new.node_copy(node, shared)
        else:
            env[node] = new.node_copy(node, lambda n: env[n])
        if node.op in ("call_module", "get_attr") and str(node.target) not in touched:
            root[str(node.target)] = (
                traced.get_submodule(str(node.target))
                if node.op == "call_module"
                else _attr(traced, str(node.target))
            )
    logits = env[result] if result in dirty else new.call_function(_repeat_rows, (env[result], m))
    new.output(new.call_function(_labels, (logits, m)))
    module = fx.GraphModule(root, new)
    module.eval()
    return module


def _attr(module: nn.Module, target: str) -> object:
    value: object = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def export_stacked_mutants(
    model: nn.Module, specs: Sequence[MutantSpec], input_shape: Sequence[int]
) -> bytes:
    """ONNX graph of :func:`stack_mutants`: input ``x`` (``N x C x H x W``), output ``labels``
    (``M x N`` int64)."""
    return _export(
        stack_mutants(model, specs, input_shape), _example(input_shape), ["labels"], {"labels": {1: "n"}}
    )


class OnnxMutantEnsemble:
    """Mutants of one CNN evaluated by ONNX Runtime, ``chunk_size`` mutants per exported graph.

    Same contract as :meth:`models.lcr.MutantEnsemble.predict`: labels ``M x N`` (CPU int64) in
    spec order, equal to :func:`models.lcr.predict_naive` (up to float round-off on near ties).

    Parameters
    ----------
    model : eval-mode CNN holding the original weights (a private copy is exported).
    specs : the mutants.
    chunk_size : mutants per graph: bounds memory, which grows with ``chunk_size x image batch``.
    threads : ORT intra-op threads (None: ORT's default).
    device : ``"cpu"`` or ``"cuda"``.
    input_shape : ``(C, H, W)`` of the images to come; other shapes are exported on first use.
    eager : export for ``input_shape`` right away (start-up) rather than on the first call; a gate
        whose LCR stops early exports its chunks eagerly and this all-mutant ensemble lazily, as
        only offline feature extraction calls it.
    """

    def __init__(
        self,
        model: nn.Module,
        specs: Sequence[MutantSpec],
        chunk_size: int = 25,
        *,
        threads: int | None = None,
        device: str | torch.device = "cpu",
        input_shape: Sequence[int] | None = None,
        eager: bool = True,
    ) -> None:
        if not specs:
            raise ConfigError("a mutant ensemble needs at least one mutant")
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = _private_copy(model)
        self.specs = tuple(specs)
        self.chunk_size = chunk_size
        self.threads = threads
        self.device = _device_name(device)
        # Chunks hold mutants sorted by their first mutated conv, so that each chunk's shared part
        # (computed once per image) reaches as far as possible; ``_inverse`` restores spec order.
        position = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        first = [min(position[name] for name, _ in spec.filters) for spec in self.specs]
        self._order = sorted(range(len(self.specs)), key=first.__getitem__)
        self._inverse = torch.argsort(torch.tensor(self._order))
        self._chunks = [
            tuple(self.specs[j] for j in self._order[i : i + chunk_size])
            for i in range(0, len(self.specs), chunk_size)
        ]
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self._sessions = _SessionCache(self._build)
        if eager and self.input_shape is not None:
            self._sessions.get(self.input_shape)

    def __len__(self) -> int:
        return len(self.specs)

    def early_stopped(self, stopping: EarlyStopping) -> SequentialLCR:
        """The early-stopping LCR with each chunk as its own ORT graph (:meth:`chunk_factory`)."""
        return SequentialLCR(
            self.model,
            self.specs,
            stopping.rule,
            stopping.chunk_size,
            stopping.min_mutants,
            factory=self.chunk_factory,
        )

    def chunk_factory(self, model: nn.Module, specs: Sequence[MutantSpec]) -> OnnxMutantEnsemble:
        """One graph for ``specs`` with this ensemble's settings: the chunks of an early-stopping LCR
        (:func:`models.sequential_lcr.chunk_ensembles`) then run on ONNX Runtime too."""
        return OnnxMutantEnsemble(
            model,
            specs,
            chunk_size=len(specs),
            threads=self.threads,
            device=self.device,
            input_shape=self.input_shape,
        )

    def _build(self, input_shape: tuple[int, ...]) -> list[object]:
        return [
            make_session(
                export_stacked_mutants(self.model, chunk, input_shape),
                threads=self.threads,
                device=self.device,
            )
            for chunk in self._chunks
        ]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Labels of every mutant: ``x`` is ``N x C x H x W``; returns ``M x N`` (CPU int64)."""
        x = _check_images(x)
        if len(x) == 0:
            return torch.empty(len(self.specs), 0, dtype=torch.long)
        sessions = self._sessions.get(x.shape[1:])
        feed = {"x": x.detach().to("cpu", torch.float32).contiguous().numpy()}
        labels = np.concatenate([s.run(None, feed)[0] for s in sessions])  # type: ignore[attr-defined]
        return torch.from_numpy(labels).long()[self._inverse]


# ------------------------------------------------------------------------------------- extractor
def onnx_extractor(
    extractor: EvidenceExtractor,
    *,
    threads: int | None = None,
    chunk_size: int = 25,
    device: str | torch.device = "cpu",
    input_shape: Sequence[int] | None = None,
) -> EvidenceExtractor:
    """The same evidence from ONNX Runtime graphs exported from ``extractor``'s torch model.

    The result is an :class:`~models.evidence.EvidenceExtractor` like any other: its ``model`` stays
    the torch CNN (for what needs torch: the general conductance, mutating, the open-world probe,
    explanations), its plain forward is :class:`OnnxForward`, a :class:`ShortcutConductance` keeps
    its stored constants and closed form and reads the logits and the layer's activation from that
    one ORT forward (``activation_forward``), a general :class:`LayerConductance` needs autograd and
    stays on torch, and the mutants (plain or prefix-sharing) become an :class:`OnnxMutantEnsemble`
    over the same specs (early-stopping chunks as their own graphs). ``input_shape`` ``(C, H, W)``
    exports every graph now (a server should, so that a broken export fails its start, not a request).
    """
    model = extractor.model
    source = extractor.conductance
    layer = source.layer_name if isinstance(source, ShortcutConductance) else None
    runner = OnnxForward(model, layer, input_shape=input_shape, threads=threads, device=device)
    conductance: ShortcutConductance | LayerConductance | None = source
    if isinstance(source, ShortcutConductance):
        conductance = ShortcutConductance(
            model,
            source.layer_name,
            source.baseline.cpu(),
            source.baseline_activation.cpu(),
            source.head_jacobian.cpu(),
            source.baseline_logits.cpu(),
            check=source.check_,
            activation_forward=runner.run,  # type: ignore[arg-type]
        )
    ensemble = None
    if extractor.ensemble is not None:
        ensemble = OnnxMutantEnsemble(
            model,
            extractor.ensemble.specs,
            chunk_size,
            threads=threads,
            device=device,
            input_shape=input_shape,
            eager=extractor.early_stopping is None,
        )
    return EvidenceExtractor(model, conductance, ensemble, extractor.early_stopping, forward=runner)

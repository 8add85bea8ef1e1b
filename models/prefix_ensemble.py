"""Mutants confined to the later layers of a CNN, so that all of them share one computed prefix.

Every mutant of :mod:`models.mutation` may touch any conv, so each one costs a whole forward pass.
If mutants only change convs inside a named set of modules (e.g. ``layer3`` of ResNet20), every
layer before those modules computes the same activations for all mutants: :class:`PrefixSharingEnsemble`
runs that prefix once per image batch and only the suffix per mutant. The split is found on the
model's ``torch.fx`` graph: a node is in the suffix when it depends on a module that may be
mutated, and the prefix outputs every value the suffix reads (skip connections included).

:func:`plan_mutant_in` plans such mutants as ordinary :class:`models.mutation.MutantSpec` objects,
so hashes, bundle storage and :class:`models.lcr.MutantEnsemble` work on them unchanged.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn

from models.architectures import check_eval
from models.errors import ConfigError, InputError
from models.mutation import (
    MutantSpec,
    Patches,
    conv_layers,
    mutant_patches,
    plan_mutant,
)
from models.sequential_lcr import EarlyStopping, StoppingRule, sequential_lcr


def _inside(name: str, modules: Sequence[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def convs_in(model: nn.Module, modules: Sequence[str]) -> list[tuple[str, nn.Conv2d]]:
    """The ``nn.Conv2d`` layers inside ``modules`` (qualified names), in ``named_modules()`` order."""
    if not modules:
        raise ConfigError("name at least one module to restrict mutants to")
    known = dict(model.named_modules())
    missing = [m for m in modules if m not in known]
    if missing:
        raise ConfigError(f"model has no modules {missing}")
    convs = [(name, conv) for name, conv in conv_layers(model) if _inside(name, modules)]
    if not convs:
        raise ConfigError(f"modules {list(modules)} hold no nn.Conv2d to mutate")
    return convs


def plan_mutant_in(
    model: nn.Module, operator: str, rate: float, seed: int, modules: Sequence[str]
) -> MutantSpec:
    """:func:`models.mutation.plan_mutant` with filters drawn only from convs inside ``modules``.

    The number of filters is the unrestricted one, ``max(1, round(rate x all filters of the
    model))``, so a restricted mutant changes as many filters as an ordinary one at the same rate
    (only where they lie differs); ``spec.rate`` records ``rate``. Same random stream as
    ``plan_mutant``, so the seed alone (with ``modules``) reproduces the spec.
    """
    return plan_mutant(model, operator, rate, seed, convs_in(model, modules))


# ------------------------------------------------------------------------------ graph split
def _dirty_nodes(graph: fx.Graph, modules: Sequence[str]) -> set[fx.Node]:
    """Nodes whose value may change with a mutation inside ``modules`` (graph order is topological)."""
    dirty: set[fx.Node] = set()
    for node in graph.nodes:
        seeded = node.op in ("call_module", "get_attr") and _inside(str(node.target), modules)
        if seeded or any(arg in dirty for arg in node.all_input_nodes):
            dirty.add(node)
    return dirty


def split_graph(
    model: nn.Module, modules: Sequence[str]
) -> tuple[fx.GraphModule, fx.GraphModule, fx.GraphModule]:
    """``(full, prefix, suffix)`` graph modules sharing ``model``'s submodules (and so its parameters).

    ``prefix(x)`` returns a tuple of the values the suffix reads; ``suffix(*values)`` returns the
    model's output. Raises :class:`ConfigError` when the model cannot be traced by ``torch.fx`` or
    its output does not depend on ``modules``.
    """
    try:
        full = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds on untraceable control flow
        raise ConfigError(
            f"cannot split {type(model).__name__} into prefix and suffix: torch.fx failed ({exc})"
        ) from exc
    dirty = _dirty_nodes(full.graph, modules)
    output = next(n for n in full.graph.nodes if n.op == "output")
    if not any(arg in dirty for arg in output.all_input_nodes):
        raise ConfigError(f"the model's output does not depend on {list(modules)}: nothing to mutate there")
    # Parameters and buffers read directly (get_attr) are re-read in the suffix rather than passed
    # across, so that every value crossing the split is an activation with the batch first.
    attrs = {n for n in full.graph.nodes if n.op == "get_attr" and any(u in dirty for u in n.users)}
    in_suffix = dirty | attrs
    boundary = [
        n
        for n in full.graph.nodes
        if n not in in_suffix and n.op != "output" and any(u in in_suffix for u in n.users)
    ]

    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in full.graph.nodes:
        if node not in in_suffix and node.op != "output":
            env[node] = prefix_graph.node_copy(node, lambda n: env[n])
    prefix_graph.output(tuple(env[n] for n in boundary))
    prefix = fx.GraphModule(model, prefix_graph)
    prefix.graph.eliminate_dead_code()
    prefix.recompile()

    suffix_graph = fx.Graph()
    senv: dict[fx.Node, fx.Node] = {
        n: suffix_graph.placeholder(f"boundary_{i}") for i, n in enumerate(boundary)
    }
    for node in full.graph.nodes:
        if node in in_suffix or node.op == "output":
            senv[node] = suffix_graph.node_copy(node, lambda n: senv[n])
    return full, prefix, fx.GraphModule(model, suffix_graph)


def _flops_by_node(gm: fx.GraphModule, x: torch.Tensor) -> dict[fx.Node, int]:
    """Multiply-accumulates of every conv and linear call for one image of ``x``'s shape."""
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(x[:1])
    modules = dict(gm.named_modules())
    flops: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules[str(node.target)]
        out = node.meta["tensor_meta"].shape
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            flops[node] = math.prod(out[1:]) * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            flops[node] = math.prod(out[1:]) * module.in_features
    return flops


class PrefixSharingEnsemble:
    """Mutants that all leave a common prefix of the CNN alone: prefix once, suffix per mutant.

    Gives exactly the labels of :func:`models.lcr.predict_naive` (same modules, same weights,
    same order of operations; a test checks it).

    Parameters
    ----------
    model : eval-mode CNN; the ensemble keeps its own copy.
    specs : mutants whose filters all lie inside ``split_module`` (see :func:`plan_mutant_in`).
    split_module : qualified name of the module whose input ends the shared prefix (e.g.
        ``"layer3"``); default: the smallest split the specs allow (the prefix stops at the first
        value that depends on a touched conv).
    """

    def __init__(
        self, model: nn.Module, specs: Sequence[MutantSpec], split_module: str | None = None
    ) -> None:
        check_eval(model, "mutants")
        if not specs:
            raise ConfigError("a mutant ensemble needs at least one mutant")
        touched = sorted({name for spec in specs for name, _ in spec.filters})
        if split_module is not None:
            convs_in(model, [split_module])  # checks the name
            outside = [name for name in touched if not _inside(name, [split_module])]
            if outside:
                raise ConfigError(f"mutants touch convs outside {split_module!r}: {outside[:5]}")
        self.specs = tuple(specs)
        self.split_module = split_module
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        modules = [split_module] if split_module else touched
        self._full, self.prefix, self.suffix = split_graph(self.model, modules)
        self._suffix_nodes = {n.name for n in _dirty_nodes(self._full.graph, modules)}
        params = dict(self.model.named_parameters())
        self._params = params
        self._patches: list[Patches] = [mutant_patches(self.model, spec) for spec in self.specs]
        self._originals: list[Patches] = [
            {name: (index, params[name][index].clone()) for name, (index, _) in p.items()}
            for p in self._patches
        ]
        self._lock = threading.Lock()  # rows are patched in place for the duration of a call

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Labels of every mutant: ``x`` is ``N x C x H x W``; returns ``M x N`` (CPU int64)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise InputError(f"expected an N x C x H x W tensor, got {getattr(x, 'shape', type(x))}")
        if len(x) == 0:
            return torch.empty(len(self.specs), 0, dtype=torch.long)
        with torch.no_grad():
            shared = self.prefix(x.to(self.device))
        return self.predict_suffix(shared)

    def predict_suffix(self, shared: tuple[torch.Tensor, ...], mutants: range | None = None) -> torch.Tensor:
        """Labels ``len(mutants) x N`` (CPU int64) from already computed prefix values ``self.prefix(x)``."""
        rows = []
        with self._lock, torch.no_grad():
            for j in mutants if mutants is not None else range(len(self.specs)):
                patches, originals = self._patches[j], self._originals[j]
                try:
                    for name, (index, values) in patches.items():
                        self._params[name].index_copy_(0, index, values)
                    rows.append(self.suffix(*shared).argmax(1))
                finally:
                    for name, (index, values) in originals.items():
                        self._params[name].index_copy_(0, index, values)
        return torch.stack(rows).cpu()

    def sequential_lcr(
        self,
        x: torch.Tensor,
        original_pred: torch.Tensor,
        rule: StoppingRule,
        chunk_size: int = 10,
        min_mutants: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Early-stopping LCR (:func:`models.sequential_lcr.sequential_lcr`) with the prefix run once.

        Chunks of ``chunk_size`` mutants in spec order run only the suffix, on the prefix values of
        the images still undecided. Returns ``(lcr (N,), mutants_used (N,))``.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise InputError(f"expected an N x C x H x W tensor, got {getattr(x, 'shape', type(x))}")
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        with torch.no_grad():
            shared = self.prefix(x.to(self.device))
        if not all(isinstance(v, torch.Tensor) and v.ndim > 0 and len(v) == len(x) for v in shared):
            raise ConfigError(
                "early stopping over a shared prefix needs batch-first tensors crossing the split"
            )
        chunks = [
            _SuffixChunk(self, range(i, min(i + chunk_size, len(self.specs))))
            for i in range(0, len(self.specs), chunk_size)
        ]
        return sequential_lcr(chunks, tuple(shared), original_pred, rule, min_mutants)

    def early_stopped(
        self, stopping: EarlyStopping
    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The early-stopping LCR with the prefix run once per batch (:meth:`sequential_lcr`)."""
        return functools.partial(
            self.sequential_lcr,
            rule=stopping.rule,
            chunk_size=stopping.chunk_size,
            min_mutants=stopping.min_mutants,
        )

    def suffix_flop_share(self, x: torch.Tensor) -> float:
        """Share of the model's conv + linear multiply-accumulates that each mutant recomputes.

        ``x`` gives the input shape (one image of it is used). A gated prediction then costs about
        ``1 + share x len(self)`` forward passes in FLOPs; measured time may differ (small layers
        are overhead-bound).
        """
        flops = _flops_by_node(self._full, x.to(self.device))
        total = sum(flops.values())
        suffix = sum(f for node, f in flops.items() if node.name in self._suffix_nodes)
        return suffix / total if total else math.nan


class _SuffixChunk:
    """A run of consecutive mutants of a :class:`PrefixSharingEnsemble`, fed prefix values."""

    def __init__(self, ensemble: PrefixSharingEnsemble, mutants: range) -> None:
        self.ensemble = ensemble
        self.mutants = mutants

    def __len__(self) -> int:
        return len(self.mutants)

    def predict(self, shared: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.ensemble.predict_suffix(shared, self.mutants)

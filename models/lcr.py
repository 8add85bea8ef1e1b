"""Label change rate: how many mutants of the CNN change its prediction on an image.

All mutants run together as one computation over the batch, never as one model load each. Two
ways, both exact (same labels as :func:`predict_naive`):

* ``vmap``: ``torch.func.functional_call`` under ``torch.func.vmap`` with only the touched
  parameters stacked per mutant (``M x ...``) and every other parameter and buffer shared. Layers
  before the first touched conv run once; untouched convs afterwards fold the mutant axis into
  the batch; touched convs become one grouped conv. Wins at small image batches, where a plain
  forward is overhead-bound.
* ``loop``: one private model copy; for each mutant, write its few changed filter rows in place,
  forward the whole image batch, restore the rows. Wins at large image batches.

``auto`` picks by image batch size, see :data:`AUTO_VMAP_MAX_BATCH`.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from models.architectures import check_eval
from models.errors import ConfigError, InputError
from models.mutation import MutantSpec, Patches, mutant_patches, mutant_tensors
from models.sequential_lcr import EarlyStopping, SequentialLCR

STRATEGIES = ("auto", "vmap", "loop")

# Largest image batch for which "auto" uses vmap. Measured on ResNet20 (1 x 28 x 28 input, 784
# filters, 100 NAI mutants of 4 filters, chunk_size 16, 1 CPU thread on a loaded 2-core machine,
# best of 3), ms per image vmap / loop: bs 1: 70 / 172, bs 4: 44 / 74, bs 16: 41 / 51,
# bs 32: 49 / 45, bs 64: 92 / 43 (a plain forward: 1.7 ms at bs 1, 0.45 ms at bs 64).
AUTO_VMAP_MAX_BATCH = 16


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise InputError(f"expected an N x C x H x W tensor, got {getattr(x, 'shape', type(x))}")


def predict_model(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Labels ``(N,)`` (CPU int64) of the unmutated model, in image batches of ``batch_size``."""
    check_eval(model, "mutants")
    _check_images(x)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


class MutantEnsemble:
    """Many mutants of one CNN, evaluated as one batched computation.

    Parameters
    ----------
    model : eval-mode CNN holding the original weights; the ensemble keeps its own copy, so later
        changes to ``model`` do not leak in and ``model`` itself is never modified.
    specs : the mutants (see :func:`models.mutation.plan_mutant`).
    chunk_size : mutants per vmap call; bounds memory (stacked touched weights and activations
        grow with ``chunk_size x image batch``).
    strategy : ``"auto"`` (vmap up to :data:`AUTO_VMAP_MAX_BATCH` images, loop above), ``"vmap"``
        or ``"loop"``.
    """

    def __init__(
        self, model: nn.Module, specs: Sequence[MutantSpec], chunk_size: int = 16, strategy: str = "auto"
    ) -> None:
        check_eval(model, "mutants")
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown LCR strategy {strategy!r}; valid: {list(STRATEGIES)}")
        if not specs:
            raise ConfigError("a mutant ensemble needs at least one mutant")
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        self.specs = tuple(specs)
        self.chunk_size = chunk_size
        self.strategy = strategy
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._params = dict(self.model.named_parameters())
        self._patches: list[Patches] = [mutant_patches(self.model, spec) for spec in self.specs]
        self._originals: list[Patches] = [
            {name: (index, self._params[name][index].clone()) for name, (index, _) in p.items()}
            for p in self._patches
        ]
        # vmap chunks hold mutants sorted by their first touched parameter: activations stay
        # unbatched (computed once) up to a chunk's first touched conv, and chunks touch fewer
        # distinct tensors. ``_inverse`` puts the rows back in spec order.
        position = {name: i for i, name in enumerate(self._params)}
        self._order = sorted(range(len(self.specs)), key=lambda j: min(position[n] for n in self._patches[j]))
        self._inverse = torch.argsort(torch.tensor(self._order))
        self._stacked: list[dict[str, torch.Tensor]] | None = None  # built on first vmap use
        # Both strategies change the private model for the duration of a call (functional_call
        # swaps parameters in, loop writes rows): serialise calls from several threads.
        self._lock = threading.Lock()

    def early_stopped(self, stopping: EarlyStopping) -> SequentialLCR:
        """The early-stopping LCR over these mutants: chunks of ``stopping.chunk_size`` ensembles,
        built now (at load, not in the first request)."""
        return SequentialLCR(
            self.model,
            self.specs,
            stopping.rule,
            stopping.chunk_size,
            stopping.min_mutants,
            factory=MutantEnsemble,
        )

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def predict(self, x: torch.Tensor, strategy: str | None = None) -> torch.Tensor:
        """Labels of every mutant: ``x`` is ``N x C x H x W``; returns ``M x N`` (CPU int64)."""
        _check_images(x)
        check_eval(self.model, "mutants")
        strategy = strategy or self.strategy
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown LCR strategy {strategy!r}; valid: {list(STRATEGIES)}")
        if strategy == "auto":
            strategy = "vmap" if len(x) <= AUTO_VMAP_MAX_BATCH else "loop"
        if len(x) == 0:
            return torch.empty(len(self.specs), 0, dtype=torch.long)
        x = x.to(self.device)
        with self._lock, torch.no_grad():
            labels = self._predict_vmap(x) if strategy == "vmap" else self._predict_loop(x)
        return labels.cpu()

    def _predict_loop(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        for patches, originals in zip(self._patches, self._originals, strict=True):
            try:
                for name, (index, values) in patches.items():
                    self._params[name].index_copy_(0, index, values)
                rows.append(self.model(x).argmax(1))
            finally:
                for name, (index, values) in originals.items():
                    self._params[name].index_copy_(0, index, values)
        return torch.stack(rows)

    def _stacks(self) -> list[dict[str, torch.Tensor]]:
        """Per chunk, the union of its touched parameters, stacked ``chunk x ...`` with each mutant's rows."""
        if self._stacked is None:
            self._stacked = []
            ordered = [self._patches[j] for j in self._order]
            for start in range(0, len(ordered), self.chunk_size):
                chunk = ordered[start : start + self.chunk_size]
                names = sorted({name for patches in chunk for name in patches})
                stacked = {
                    n: self._params[n].unsqueeze(0).repeat(len(chunk), *([1] * self._params[n].ndim))
                    for n in names
                }
                for j, patches in enumerate(chunk):
                    for name, (index, values) in patches.items():
                        stacked[name][j].index_copy_(0, index, values)
                self._stacked.append(stacked)
        return self._stacked

    def _predict_vmap(self, x: torch.Tensor) -> torch.Tensor:
        def forward(params: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model, params, (images,), strict=False)

        batched = vmap(forward, in_dims=(0, None))
        labels = torch.cat([batched(stacked, x).argmax(-1) for stacked in self._stacks()])
        return labels[self._inverse.to(labels.device)]


def predict_naive(model: nn.Module, specs: Sequence[MutantSpec], x: torch.Tensor) -> torch.Tensor:
    """Reference: one full model copy per mutant, weights set through ``load_state_dict``.

    Slow on purpose and independent of the ensemble's patching code; returns ``M x N`` labels.
    """
    check_eval(model, "mutants")
    _check_images(x)
    rows = []
    with torch.no_grad():
        for spec in specs:
            mutant = copy.deepcopy(model)
            state = mutant.state_dict()
            state.update(mutant_tensors(model, spec))
            mutant.load_state_dict(state)
            rows.append(mutant(x).argmax(1).cpu())
    return torch.stack(rows)


def label_change_rate(mutant_labels: torch.Tensor, original_pred: torch.Tensor) -> torch.Tensor:
    """Share of mutants whose label differs from the original model's prediction (not the true label).

    Parameters
    ----------
    mutant_labels : ``M x N`` labels, one row per mutant.
    original_pred : ``(N,)`` predictions of the unmutated model.

    Returns
    -------
    ``(N,)`` float32 in [0, 1].
    """
    if mutant_labels.ndim != 2 or original_pred.shape != mutant_labels.shape[1:] or len(mutant_labels) == 0:
        raise InputError(
            f"expected M x N mutant labels (M >= 1) and N predictions, got "
            f"{tuple(mutant_labels.shape)} and {tuple(original_pred.shape)}"
        )
    return (mutant_labels != original_pred.to(mutant_labels.device).view(1, -1)).float().mean(0)

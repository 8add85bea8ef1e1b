"""Layer conductance (Dhamdhere, Yan & Sundararajan, "How important is a neuron?", ICLR 2019).

Conductance of channel ``c`` of layer ``L`` for input ``x``, baseline ``x'`` and target class ``p``::

    cond_c(x) = sum_hw sum_{k=1..n} dF_p/dA(x_j)[c,h,w] * (A(x_k) - A(x_{k-1}))[c,h,w],
    x_k = x' + (k/n) (x - x'),  j = k-1 ("left" rule) or j = k ("right" rule)

``F_p`` is the pre-softmax logit. The left rule is what captum's ``LayerConductance(...,
method="riemann_trapezoid")`` evaluates, so captum is an exact reference; the right rule is what the
paper's reference code used. Summing over channels gives ``F_p(x) - F_p(x')`` up to the Riemann error
(completeness), exactly so wherever the part of the network after ``L`` is affine.

Two implementations share one layer-capture mechanism:

* :class:`LayerConductance`, the general form: all ``n + 1`` path points of a batch go through the
  model as one batch, followed by one ``autograd.grad``.
* :class:`ShortcutConductance`, the exact closed form for an affine suffix (pooling, eval dropout,
  linear head): the sum telescopes to ``sum_hw J_p * (A(x) - A(x'))`` with a constant Jacobian ``J``,
  so one ordinary forward pass suffices. It refuses to run unless it was checked against the general
  form on real samples (:func:`verify_shortcut`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Self

import torch
from torch import Tensor, nn

from models.architectures import check_eval, resolve_layer
from models.errors import BundleError, ConfigError, InputError

Rule = Literal["left", "right"]

__all__ = [
    "ConductanceResult",
    "LayerConductance",
    "ShortcutCheck",
    "ShortcutConductance",
    "step_gradients",
    "verify_shortcut",
]


# --------------------------------------------------------------------------------------------------
# Integration rules
# --------------------------------------------------------------------------------------------------

_STEP_RULES: dict[str, Callable[[Tensor], Tensor]] = {
    # Gradient at x_{k-1} multiplies the step A(x_k) - A(x_{k-1}): captum's riemann_trapezoid.
    "left": lambda grads: grads[:-1],
    # Gradient at x_k: the paper's reference code.
    "right": lambda grads: grads[1:],
}


def _check_rule(rule: str) -> str:
    if rule not in _STEP_RULES:
        raise ConfigError(f"unknown step rule {rule!r}; valid choices: {sorted(_STEP_RULES)}")
    return rule


def step_gradients(grads: Tensor, rule: str) -> Tensor:
    """Gradients that multiply the ``n`` activation steps under ``rule``.

    Parameters
    ----------
    grads : Tensor, ``(n + 1) x ...``
        ``dF/dA`` at the path points ``x_0 .. x_n``.
    rule : {"left", "right"}
        Which end of each step supplies the gradient.

    Returns
    -------
    Tensor, ``n x ...``
    """
    return _STEP_RULES[_check_rule(rule)](grads)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConductanceResult:
    """Per-channel conductance of a batch, with the model outputs that came free with it.

    Attributes
    ----------
    conductance : Tensor, ``N x C_layer``
        Conductance of each channel, summed over the layer's spatial positions.
    logits : Tensor, ``N x K``
        Pre-softmax outputs at ``x``.
    prediction : Tensor, ``N`` (int64)
        ``argmax`` of ``logits``.
    target : Tensor, ``N`` (int64)
        Class whose logit was attributed (the prediction unless given).
    baseline_logits : Tensor, ``N x K``
        Pre-softmax outputs at the baseline; with ``logits`` they give the completeness gap.
    activation : Tensor or None, ``N x C_layer x h x w``
        The layer's output at ``x``, when asked for.
    """

    conductance: Tensor
    logits: Tensor
    prediction: Tensor
    target: Tensor
    baseline_logits: Tensor
    activation: Tensor | None = None

    def completeness_error(self) -> Tensor:
        """``sum_c cond_c - (F_p(x) - F_p(x'))`` per image, ``N``: zero up to the Riemann error."""
        idx = self.target.view(-1, 1)
        delta = self.logits.gather(1, idx) - self.baseline_logits.gather(1, idx)
        return self.conductance.sum(1) - delta.view(-1)


@dataclass(frozen=True)
class ShortcutCheck:
    """Outcome of comparing the shortcut with the general form on real samples.

    ``max_rel_diff`` is ``max |shortcut - general| / max |general|`` over every image and channel.
    """

    max_rel_diff: float
    max_abs_diff: float
    tol: float
    n_samples: int

    @property
    def ok(self) -> bool:
        return bool(self.max_rel_diff <= self.tol)


# --------------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------------


class _LayerCapture:
    """Forward hook that records the layer's output, optionally as the root of the only graph.

    With ``track_grad`` the hook detaches the output into a leaf that requires grad and switches grad
    mode on, so a forward started under ``torch.no_grad()`` records nothing for the prefix (measured
    25-38 % faster than recording it) and everything from the layer to the logits. Grad mode is
    thread-local and the enclosing ``no_grad`` restores it on exit, so no model state
    (``requires_grad`` flags) changes. The suffix receives a clone: in-place operations after the
    layer (``out += identity``, inplace ReLU) then neither fail on the leaf nor corrupt the recorded
    activation. Hooks are module state shared by all threads, so calls from threads other than the
    one that entered are let through untouched (a server may run the same model concurrently).
    """

    def __init__(self, layer: nn.Module, track_grad: bool) -> None:
        self.layer = layer
        self.track_grad = track_grad
        self.activation: Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._thread = threading.get_ident()

    def __enter__(self) -> Self:
        self._thread = threading.get_ident()
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, inputs: object, output: object) -> Tensor | None:
        if threading.get_ident() != self._thread:
            return None
        if not isinstance(output, Tensor):
            raise ConfigError(
                f"conductance needs a layer whose output is one tensor; {type(module).__name__} "
                f"returned {type(output).__name__}"
            )
        if self.activation is not None:
            raise ConfigError("the conductance layer is called more than once per forward pass")
        act = output.detach()
        if self.track_grad:
            act.requires_grad_(True)
            torch.set_grad_enabled(True)
            self.activation = act
            return act.clone()
        self.activation = act.clone()
        return output

    def take(self) -> Tensor:
        """The recorded activation; resets so that the next forward can record again."""
        if self.activation is None:
            raise ConfigError("the conductance layer was not called during the forward pass")
        act, self.activation = self.activation, None
        return act


def _check_input(x: object) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        desc = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"expected a float tensor N x C x H x W, got {desc}")
    if x.shape[0] == 0:
        raise InputError("expected at least one image")
    return x


def _check_target(target: Tensor | None, n: int, n_classes: int) -> Tensor | None:
    if target is None:
        return None
    target = torch.as_tensor(target)
    if target.ndim != 1 or target.shape[0] != n or target.is_floating_point():
        raise InputError(f"target must be {n} integer class indices, got shape {tuple(target.shape)}")
    if int(target.min()) < 0 or int(target.max()) >= n_classes:
        raise InputError(f"target classes must lie in [0, {n_classes}), got {target.tolist()}")
    return target.long()


def _baseline_like(baseline: Tensor | None, x: Tensor) -> Tensor:
    """The baseline as ``1 x C x H x W`` on ``x``'s device and dtype."""
    if baseline is None:
        return torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=x.device)
    if tuple(baseline.shape[-3:]) != tuple(x.shape[1:]):
        raise InputError(f"images are {tuple(x.shape[1:])} but the baseline is {tuple(baseline.shape[-3:])}")
    return baseline.to(device=x.device, dtype=x.dtype).reshape(1, *x.shape[1:])


def _as_baseline(baseline: Tensor | None) -> Tensor | None:
    if baseline is None:
        return None
    if baseline.ndim == 4 and baseline.shape[0] == 1:
        baseline = baseline[0]
    if baseline.ndim != 3:
        raise ConfigError(f"baseline must be one image C x H x W, got shape {tuple(baseline.shape)}")
    return baseline.detach()


def _chunks(n: int, chunk_size: int | None, progress: bool, desc: str) -> Iterator[slice]:
    size = n if chunk_size is None else chunk_size
    if size < 1:
        raise ConfigError(f"chunk_size must be a positive number of images, got {chunk_size}")
    starts: Iterator[int] | range = range(0, n, size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, total=-(-n // size))
    for start in starts:
        yield slice(start, min(start + size, n))


def _concat(parts: list[ConductanceResult], with_activation: bool) -> ConductanceResult:
    if len(parts) == 1:
        return parts[0]
    return ConductanceResult(
        conductance=torch.cat([p.conductance for p in parts]),
        logits=torch.cat([p.logits for p in parts]),
        prediction=torch.cat([p.prediction for p in parts]),
        target=torch.cat([p.target for p in parts]),
        baseline_logits=torch.cat([p.baseline_logits for p in parts]),
        activation=torch.cat([p.activation for p in parts if p.activation is not None])
        if with_activation
        else None,
    )


# --------------------------------------------------------------------------------------------------
# General form
# --------------------------------------------------------------------------------------------------


class LayerConductance:
    """Conductance of every channel of one layer along the straight path from a baseline.

    Dhamdhere et al. (2019), with the Riemann sum over ``n_steps + 1`` equally spaced points.
    Holds the model parts and the integration settings; :meth:`attribute` does the work.

    Parameters
    ----------
    model : nn.Module
        Maps ``N x C x H x W`` inputs to ``N x K`` pre-softmax logits; must be in eval mode.
    layer : str
        Name of the module (``model.get_submodule``) whose output is attributed, e.g. ``"layer3"``.
    n_steps : int
        Number of Riemann steps ``n`` (the model sees ``n + 1`` points per image).
    rule : {"left", "right"}
        Which end of each step supplies the gradient; ``"left"`` equals captum's
        ``method="riemann_trapezoid"``, ``"right"`` the paper's reference code.
    baseline : Tensor or None, ``C x H x W``
        Path start in the model's (normalised) input space; zeros when None.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        n_steps: int = 10,
        rule: Rule = "left",
        baseline: Tensor | None = None,
    ) -> None:
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ConfigError(f"n_steps must be a positive integer, got {n_steps!r}")
        self.model = model
        self.layer_name = layer
        self.layer = resolve_layer(model, layer)
        self.n_steps = n_steps
        self.rule = _check_rule(rule)
        self.baseline = _as_baseline(baseline)

    def attribute(
        self,
        x: Tensor,
        target: Tensor | None = None,
        *,
        chunk_size: int | None = None,
        return_activation: bool = False,
        progress: bool = False,
    ) -> ConductanceResult:
        """Conductance of each channel of the layer for each image.

        Parameters
        ----------
        x : Tensor, ``N x C x H x W``
            Normalised images.
        target : Tensor or None, ``N`` (int)
            Class whose logit is attributed; the model's prediction at ``x`` when None (read from
            the same batch, no extra forward).
        chunk_size : int or None
            Images per forward pass (each becomes ``n_steps + 1`` rows); all at once when None.
            Bounds memory without changing results.
        return_activation : bool
            Also return the layer's output at ``x``.
        progress : bool
            Show a progress bar over chunks.

        Returns
        -------
        ConductanceResult
            ``conductance`` is ``N x C_layer``.
        """
        x = _check_input(x)
        check_eval(self.model, "conductance")
        if torch.is_inference_mode_enabled():
            raise ConfigError("general-form conductance needs autograd; call it outside inference_mode")
        baseline = _baseline_like(self.baseline, x)
        if target is not None:
            target = torch.as_tensor(target)
            if target.ndim != 1 or target.shape[0] != x.shape[0]:
                raise InputError(f"target must hold {x.shape[0]} class indices, got {tuple(target.shape)}")
        parts = [
            self._attribute(x[s], baseline, None if target is None else target[s], return_activation)
            for s in _chunks(x.shape[0], chunk_size, progress, "conductance")
        ]
        return _concat(parts, return_activation)

    def _attribute(
        self, x: Tensor, baseline: Tensor, target: Tensor | None, return_activation: bool
    ) -> ConductanceResult:
        n, m = self.n_steps, x.shape[0]
        alphas = [k / n for k in range(n + 1)]
        # Alpha-major rows (all images at alpha 0, then alpha 1/n, ...), as captum lays them out.
        path = torch.cat([baseline + a * (x - baseline) for a in alphas], dim=0)
        capture = _LayerCapture(self.layer, track_grad=True)
        with capture, torch.no_grad():
            logits = self.model(path)
        act = capture.take()
        with torch.enable_grad():  # the caller may be under no_grad; the graph must reach the target
            logits = logits.view(n + 1, m, -1)
        final = logits[-1].detach()
        prediction = final.argmax(1)
        target = prediction if target is None else _check_target(target, m, final.shape[1])
        assert target is not None
        with torch.enable_grad():
            objective = logits.gather(2, target.to(x.device).view(1, m, 1).expand(n + 1, m, 1)).sum()
        (grads,) = torch.autograd.grad(objective, act)
        act = act.detach().view(n + 1, m, *act.shape[1:])
        grads = grads.view(n + 1, m, *grads.shape[1:])
        per_element = (step_gradients(grads, self.rule) * (act[1:] - act[:-1])).sum(0)
        return ConductanceResult(
            conductance=per_element.reshape(m, per_element.shape[1], -1).sum(2),
            logits=final,
            prediction=prediction,
            target=target,
            baseline_logits=logits[0].detach(),
            activation=act[-1] if return_activation else None,
        )


# --------------------------------------------------------------------------------------------------
# Exact shortcut for an affine suffix
# --------------------------------------------------------------------------------------------------


def _head_jacobian(
    model: nn.Module, layer: nn.Module, baseline: Tensor, probes: int = 2
) -> tuple[Tensor, Tensor, Tensor]:
    """Baseline activation, baseline logits and ``dF/dA`` at the baseline.

    Returns the Jacobian as ``K x C`` when every class's gradient is the same at every spatial
    position (global average pooling before a linear head: ``w / (h w)``), else as ``K x C x h x w``.
    Spatial uniformity is tested with random class mixtures first, so that a large head (InceptionV3:
    1000 x 2048 x 8 x 8 floats = 0.5 GB) is never materialised when it is not needed.
    """
    capture = _LayerCapture(layer, track_grad=True)
    with capture, torch.no_grad():
        logits = model(baseline.unsqueeze(0))
    act = capture.take()
    with torch.enable_grad():
        logits = logits.view(-1)
    n_classes = logits.shape[0]
    generator = torch.Generator().manual_seed(0)
    spatial = tuple(range(2, act.ndim))
    uniform = bool(spatial)
    for _ in range(probes if uniform else 0):
        mix = torch.randn(n_classes, generator=generator).to(logits)
        with torch.enable_grad():
            obj = (logits * mix).sum()
        (g,) = torch.autograd.grad(obj, act, retain_graph=True)
        spread = (g - g.mean(spatial, keepdim=True)).abs().max()
        uniform = uniform and bool(spread <= 1e-6 * g.abs().max().clamp_min(1e-30))
    rows = []
    for k in range(n_classes):
        with torch.enable_grad():
            obj = logits[k] * 1.0
        (g,) = torch.autograd.grad(obj, act, retain_graph=k < n_classes - 1)
        rows.append(g[0].mean(tuple(d - 1 for d in spatial)) if uniform else g[0])
    return act[0].detach(), logits.detach(), torch.stack(rows)


class ShortcutConductance:
    """Conductance in closed form where everything after the layer is affine.

    Then ``dF_p/dA`` is a constant ``J_p`` and the Riemann sum telescopes, for any step count and
    either rule, to ``cond_c = sum_hw J_p[c,h,w] * (A(x) - A(x'))[c,h,w]``: one forward pass at
    ``x`` plus two constants of the bundle, the baseline activation ``A(x')`` and ``J``. Build it
    with :meth:`from_model` (or reload with :meth:`from_state`); :meth:`attribute` refuses to run
    until :meth:`verify` has shown on real samples that it equals the general form.

    Parameters
    ----------
    model : nn.Module
        The classifier, in eval mode.
    layer : str
        Name of the attributed module.
    baseline : Tensor, ``C x H x W``
        Path start in input space.
    baseline_activation : Tensor, ``C_layer x h x w``
        ``A(x')``.
    head_jacobian : Tensor, ``K x C_layer`` or ``K x C_layer x h x w``
        ``dF_k/dA``; the 2-D form holds the gradient shared by every spatial position.
    baseline_logits : Tensor, ``K``
        ``F(x')``.
    check : ShortcutCheck or None
        Outcome of the comparison with the general form, if already made.
    activation_forward : callable or None
        ``x -> (logits, A(x))`` from another runtime (ONNX Runtime's graph returns both); None: the
        torch model's forward, with ``A(x)`` read by a hook on ``layer``.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        baseline: Tensor,
        baseline_activation: Tensor,
        head_jacobian: Tensor,
        baseline_logits: Tensor,
        check: ShortcutCheck | None = None,
        activation_forward: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        self.model = model
        self.activation_forward = activation_forward
        self.layer_name = layer
        self.layer = resolve_layer(model, layer)
        self.baseline = baseline
        self.baseline_activation = baseline_activation
        self.head_jacobian = head_jacobian
        self.baseline_logits = baseline_logits
        self.check_ = check

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        layer: str,
        input_shape: tuple[int, int, int] | torch.Size,
        baseline: Tensor | None = None,
        *,
        samples: Tensor | None = None,
        n_steps: int = 10,
        tol: float = 1e-5,
        chunk_size: int | None = None,
    ) -> ShortcutConductance:
        """Compute the constants from the model; with ``samples``, also prove the shortcut on them.

        Parameters
        ----------
        input_shape : ``(C, H, W)``
            Shape of one normalised input image.
        baseline : Tensor or None, ``C x H x W``
            Zeros when None.
        samples : Tensor or None, ``N x C x H x W``
            Real images to run :meth:`verify` on; raises :class:`ConfigError` if it fails.
        """
        check_eval(model, "conductance")
        module = resolve_layer(model, layer)
        ref = next(iter(model.parameters()), torch.zeros(()))
        shape = tuple(int(v) for v in input_shape)
        base = _as_baseline(baseline)
        if base is None:
            base = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
        elif tuple(base.shape) != shape:
            raise ConfigError(f"baseline is {tuple(base.shape)} but input_shape is {shape}")
        base = base.to(device=ref.device, dtype=ref.dtype)
        act, logits, jac = _head_jacobian(model, module, base)
        shortcut = cls(model, layer, base, act, jac, logits)
        if samples is not None:
            check = shortcut.verify(samples, n_steps=n_steps, tol=tol, chunk_size=chunk_size)
            if not check.ok:
                raise ConfigError(
                    f"the conductance shortcut at {layer!r} differs from the general form by "
                    f"{check.max_rel_diff:.3g} (relative, tolerance {tol:g}): the part of the model after "
                    "this layer is not affine; use LayerConductance there"
                )
        return shortcut

    def verify(
        self, samples: Tensor, n_steps: int = 10, tol: float = 1e-5, chunk_size: int | None = None
    ) -> ShortcutCheck:
        """Compare with the general (left-rule) form on ``samples``; the result gates :meth:`attribute`."""
        samples = _check_input(samples)
        fast = self._attribute(samples, None, return_activation=False, chunk_size=chunk_size)
        general = LayerConductance(
            self.model, self.layer_name, n_steps=n_steps, rule="left", baseline=self.baseline
        ).attribute(samples, target=fast.target, chunk_size=chunk_size)
        diff = float((fast.conductance - general.conductance).abs().max())
        scale = float(general.conductance.abs().max())
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        self.check_ = ShortcutCheck(max_rel_diff=rel, max_abs_diff=diff, tol=tol, n_samples=samples.shape[0])
        return self.check_

    def attribute(
        self,
        x: Tensor,
        target: Tensor | None = None,
        *,
        chunk_size: int | None = None,
        return_activation: bool = False,
        progress: bool = False,
    ) -> ConductanceResult:
        """Conductance of each channel for each image, from one forward pass.

        Same arguments and result as :meth:`LayerConductance.attribute`. Raises :class:`ConfigError`
        when the shortcut has not been verified or failed its verification.
        """
        if self.check_ is None:
            raise ConfigError("the conductance shortcut is unverified; call verify(samples) first")
        if not self.check_.ok:
            raise ConfigError(
                f"the conductance shortcut failed its check ({self.check_.max_rel_diff:.3g} > "
                f"{self.check_.tol:g}); use LayerConductance for layer {self.layer_name!r}"
            )
        return self._attribute(_check_input(x), target, return_activation, chunk_size, progress)

    def _attribute(
        self,
        x: Tensor,
        target: Tensor | None,
        return_activation: bool,
        chunk_size: int | None = None,
        progress: bool = False,
    ) -> ConductanceResult:
        check_eval(self.model, "conductance")
        _baseline_like(self.baseline, x)  # shape check only
        if target is not None:
            target = torch.as_tensor(target)
            if target.ndim != 1 or target.shape[0] != x.shape[0]:
                raise InputError(f"target must hold {x.shape[0]} class indices, got {tuple(target.shape)}")
        parts = []
        for s in _chunks(x.shape[0], chunk_size, progress, "conductance"):
            parts.append(
                self._attribute_chunk(x[s], None if target is None else target[s], return_activation)
            )
        return _concat(parts, return_activation)

    def _attribute_chunk(
        self, x: Tensor, target: Tensor | None, return_activation: bool
    ) -> ConductanceResult:
        if self.activation_forward is not None:
            logits, act = self.activation_forward(x)
        else:
            capture = _LayerCapture(self.layer, track_grad=False)
            with capture, torch.no_grad():
                logits = self.model(x)
            act = capture.take()
        if tuple(act.shape[1:]) != tuple(self.baseline_activation.shape):
            raise InputError(
                f"layer output is {tuple(act.shape[1:])} but the shortcut was built for "
                f"{tuple(self.baseline_activation.shape)}"
            )
        logits = logits.detach()
        prediction = logits.argmax(1)
        target = prediction if target is None else _check_target(target, x.shape[0], logits.shape[1])
        assert target is not None
        jac = self.head_jacobian.to(act)[target.to(act.device)]
        delta = act - self.baseline_activation.to(act)
        n, c = delta.shape[:2]
        if jac.ndim == 2:  # same gradient at every position
            cond = jac * delta.reshape(n, c, -1).sum(2)
        else:
            cond = (jac * delta).reshape(n, c, -1).sum(2)
        return ConductanceResult(
            conductance=cond,
            logits=logits,
            prediction=prediction,
            target=target,
            baseline_logits=self.baseline_logits.to(logits).expand_as(logits),
            activation=act if return_activation else None,
        )

    # -- persistence ------------------------------------------------------------------------------

    _KEYS = ("baseline", "baseline_activation", "head_jacobian", "baseline_logits", "check")

    def state_dict(self) -> dict[str, Tensor]:
        """The constants as named CPU tensors (safetensors-ready).

        ``check`` holds ``[max_rel_diff, max_abs_diff, tol, n_samples]`` of the last verification
        (NaN when never verified).
        """
        c = self.check_
        check = [c.max_rel_diff, c.max_abs_diff, c.tol, float(c.n_samples)] if c else [float("nan")] * 4
        return {
            "baseline": self.baseline.detach().cpu().contiguous(),
            "baseline_activation": self.baseline_activation.detach().cpu().contiguous(),
            "head_jacobian": self.head_jacobian.detach().cpu().contiguous(),
            "baseline_logits": self.baseline_logits.detach().cpu().contiguous(),
            "check": torch.tensor(check, dtype=torch.float64),
        }

    @classmethod
    def from_state(
        cls, model: nn.Module, layer: str, tensors: dict[str, Tensor], rtol: float = 1e-4
    ) -> ShortcutConductance:
        """Rebuild from :meth:`state_dict`, refusing constants that were not verified or do not fit.

        One forward pass at the stored baseline must reproduce the stored baseline activation and
        logits (relative ``rtol``): this catches constants saved with a different model or layer.

        Raises
        ------
        BundleError
            A key is missing, the stored check failed or is absent, or the constants disagree with
            ``model``.
        """
        missing = [k for k in cls._KEYS if k not in tensors]
        if missing:
            raise BundleError(f"conductance shortcut constants lack {missing}")
        rel, diff, tol, n_samples = (float(v) for v in tensors["check"].tolist())
        if not rel <= tol:  # also catches NaN (never verified)
            raise BundleError(
                f"conductance shortcut constants were not verified against the general form "
                f"(max_rel_diff={rel}, tolerance={tol})"
            )
        check_eval(model, "conductance")
        module = resolve_layer(model, layer)
        ref = next(iter(model.parameters()), torch.zeros(()))
        baseline = tensors["baseline"].to(device=ref.device, dtype=ref.dtype)
        capture = _LayerCapture(module, track_grad=False)
        with capture, torch.no_grad():
            logits = model(baseline.unsqueeze(0))[0]
        act = capture.take()[0]
        stored_act = tensors["baseline_activation"].to(act)
        stored_logits = tensors["baseline_logits"].to(logits)
        jac = tensors["head_jacobian"].to(act)
        k, c = stored_logits.shape[0], stored_act.shape[0]
        shape_ok = (
            act.shape == stored_act.shape
            and logits.shape == stored_logits.shape
            and jac.shape[:2] == (k, c)
            and (jac.ndim == 2 or jac.shape[1:] == stored_act.shape)
        )
        if not shape_ok or not (_close(act, stored_act, rtol) and _close(logits, stored_logits, rtol)):
            raise BundleError(f"conductance shortcut constants do not match this model at layer {layer!r}")
        check = ShortcutCheck(max_rel_diff=rel, max_abs_diff=diff, tol=tol, n_samples=int(n_samples))
        return cls(model, layer, baseline, stored_act, jac, stored_logits, check=check)


def _close(a: Tensor, b: Tensor, rtol: float) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) <= rtol * max(scale, 1e-12)


def verify_shortcut(
    model: nn.Module,
    layer: str,
    x_samples: Tensor,
    n_steps: int = 10,
    tol: float = 1e-5,
    baseline: Tensor | None = None,
    chunk_size: int | None = None,
) -> ShortcutCheck:
    """Whether the closed form equals the general form at ``layer`` on ``x_samples`` (no raise).

    ``max_rel_diff`` is ``max |shortcut - general| / max |general|``; ``ok`` when it is at most ``tol``.
    """
    x_samples = _check_input(x_samples)
    shortcut = ShortcutConductance.from_model(model, layer, tuple(x_samples.shape[1:]), baseline)
    return shortcut.verify(x_samples, n_steps=n_steps, tol=tol, chunk_size=chunk_size)

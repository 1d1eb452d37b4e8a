"""Per-sample gradient clipping: the expensive half of DP-SGD.

A backend computes, for one batch, ``sum_i clip_C(grad_i)``: every example's gradient
scaled to L2 norm at most ``C`` (Opacus' factor ``min(1, C / (||g_i|| + 1e-6))``), then
summed. Noise and scaling are the caller's (:mod:`privacy.dpsgd`).

* :class:`LinearClipper` (``engine=fast``): for models whose parameters all sit in
  ``nn.Linear`` layers fed 2-D batches (the tabular models). The gradient of a linear
  layer for example ``i`` is the outer product ``g_i a_i^T`` of the gradient at its output
  and its input, so its norm is ``||g_i|| * ||a_i||`` (Goodfellow 2015; Opacus' "ghost
  norm"). One forward pass, one backward pass to the layer *outputs* only (autograd skips
  the weight gradients), then one ``(c*G)^T A`` product per layer with the clip factors
  ``c`` folded in: about the cost of non-private training, no per-sample gradient ever
  materialised and no second backward pass (Opacus' ghost clipping needs two).
* :class:`OpacusClipper` (``engine=opacus`` / ``functorch``): any model Opacus supports,
  per-sample gradients from Opacus' ``GradSampleModule`` (hooks or functorch).

Both return the same numbers up to float rounding; a test checks them against each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.grad import conv2d_weight
from typing_extensions import override

T = TypeVar("T", torch.Tensor, np.ndarray)

#: autograd's C++ engine, which ``torch.autograd.grad`` calls after its Python-side argument
#: handling (type dispatch, ``ones_like`` for the scalar loss, debug-logging hooks, a context
#: copy for ``torch.compile``): ~10 us of a small model's ~150 us step, none of which a fixed
#: scalar loss and a list of plain tensors need. The same engine call, so the same numbers.
#: Falls back to ``torch.autograd.grad`` where a torch build does not expose it.
_ENGINE = getattr(getattr(getattr(torch.autograd, "variable", None), "Variable", None), "_execution_engine", None)


def _output_grads(loss: torch.Tensor, one: torch.Tensor, outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The gradients d loss / d output for each tensor of ``outputs`` (``one`` = ones like the scalar ``loss``)."""
    if _ENGINE is None:
        return torch.autograd.grad(loss, outputs, grad_outputs=one)
    # (tensors, grad_tensors, keep_graph, create_graph, inputs, allow_unused, accumulate_grad)
    return _ENGINE.run_backward((loss,), (one,), False, False, outputs, False, False)  # type: ignore[no-any-return]

ENGINES = ("auto", "fast", "opacus", "functorch")
#: Modules without parameters that act on each example independently.
_PER_SAMPLE_SAFE = (nn.Sequential, nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.Dropout,
                    nn.Identity, nn.Flatten, nn.SiLU)


def clip_factors(norms: T, max_grad_norm: float) -> T:
    """Opacus' per-sample clip factors ``min(1, C / (norm + 1e-6))``, of a torch tensor or a
    NumPy array of norms (the same dtype back)."""
    if isinstance(norms, np.ndarray):
        return np.minimum(max_grad_norm / (norms + 1e-6), 1.0).astype(norms.dtype, copy=False)  # type: ignore[return-value]
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # type: ignore[operator,union-attr]


class Clipper(Protocol):
    """One batch's clipped per-sample gradient sum."""

    def clipped_sum(self, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float
                    ) -> tuple[list[torch.Tensor], float, int]:
        """``(sum of clipped gradients per trainable parameter, summed loss, examples clipped)``."""
        ...

    def close(self) -> None:
        """Detach from the model."""
        ...


def linear_supported(model: nn.Module) -> bool:
    """True if every parameter lives in an ``nn.Linear`` and every other module is a
    parameter-free per-example operation (so :class:`LinearClipper` is exact)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) or module is model:
            continue
        if any(True for _ in module.parameters(recurse=False)) or not isinstance(module, _PER_SAMPLE_SAFE):
            return False
    return any(isinstance(m, nn.Linear) for m in model.modules())


class _RecordingClipper:
    """What :class:`LinearClipper` and :class:`LayerClipper` share: each clipped layer's input
    and output recorded by a wrapper of its forward (an instance attribute: a forward hook would
    take nn.Module's slower call path on every layer, every step), one forward pass, one backward
    pass to the layer outputs only, and where each layer's gradients go in the caller's buffers.
    A subclass sets :attr:`needs` (named in errors) and turns ``(inputs, output gradients)`` into
    the clipped sum."""

    needs = "each layer with parameters called once per forward pass"

    def __init__(self, model: nn.Module, loss_fn: nn.Module, layers: list[nn.Module]) -> None:
        if not all(p.requires_grad for p in model.parameters()):
            raise ValueError(f"{type(self).__name__} trains every parameter; use engine=opacus for frozen layers")
        self.model, self.loss_fn, self.layers = model, loss_fn, layers
        self._io: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in self.layers:
            layer.forward = self._recording(layer)  # type: ignore[method-assign]
        self.params = [p for p in model.parameters() if p.requires_grad]
        order = {id(p): i for i, p in enumerate(self.params)}
        # per layer: where its weight's and bias's gradients go in ``out`` (None: no bias)
        self._slots: list[tuple[int, int | None]] = [
            (order[id(m.weight)], None if m.bias is None else order[id(m.bias)]) for m in self.layers]
        self._one = torch.ones((), dtype=self.params[0].dtype if self.params else torch.float32)

    def _recording(self, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        forward = layer.forward

        def record(x: torch.Tensor) -> torch.Tensor:
            out = forward(x)
            self._io.append((x, out))
            return out

        return record

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor
                          ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, ...]]:
        """``(summed loss, each layer's (input, output), each layer's output gradient)``."""
        self._io.clear()
        loss = self.loss_fn(self.model(x), y)
        io, self._io = self._io, []
        if len(io) != len(self.layers):
            raise ValueError(f"{type(self).__name__} needs {self.needs}")
        if loss.dtype != self._one.dtype:
            self._one = torch.ones((), dtype=loss.dtype)
        return loss, io, _output_grads(loss, self._one, tuple(o for _, o in io))

    def clipped_sum(self, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float, scale: float = 1.0
                    ) -> tuple[list[torch.Tensor], float, int]:
        """As :meth:`Clipper.clipped_sum`; ``scale`` multiplies the result (folded into the clip factors)."""
        out = [torch.empty_like(p) for p in self.params]
        loss, clipped = self.clipped_sum_into(out, x, y, max_grad_norm, scale)
        return out, loss, clipped

    def clipped_sum_into(self, out: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, max_grad_norm: float,
                         scale: float = 1.0) -> tuple[float, int]:
        """:meth:`clipped_sum` written into ``out`` (one tensor per trainable parameter, in
        ``model.parameters()`` order; views of one flat buffer let the caller add the noise in a
        single operation). Returns ``(summed loss, examples clipped)``."""
        raise NotImplementedError

    def close(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)


class LinearClipper(_RecordingClipper):
    """Exact per-sample clipping for linear models from layer inputs and output gradients."""

    needs = "each linear layer called once per forward pass on 2-D input"

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        if not linear_supported(model):
            raise ValueError(f"{type(model).__name__} has layers other than nn.Linear with parameters")
        super().__init__(model, loss_fn, [m for m in model.modules() if isinstance(m, nn.Linear)])

    @override
    def clipped_sum_into(self, out: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, max_grad_norm: float,
                         scale: float = 1.0) -> tuple[float, int]:
        loss, io, outs = self._forward_backward(x, y)
        # The per-example norms are a few small vectors per layer: in NumPy, whose per-call cost is
        # a fraction of a torch operator's (what dominated DP-SGD's overhead on small models).
        # ||g_i a_i^T||^2 + ||g_i||^2 (bias) = ||g_i||^2 (||a_i||^2 + 1)
        acts = []
        norms2 = None
        for (a, _), g, (_, bias) in zip(io, outs, self._slots, strict=True):
            a = a.detach()
            a_np, g_np = a.numpy(), g.numpy()
            if a_np.ndim != 2:
                raise ValueError(f"LinearClipper needs {self.needs}")
            a2 = np.vecdot(a_np, a_np)
            if bias is not None:
                a2 += 1
            term = np.vecdot(g_np, g_np) * a2
            norms2 = term if norms2 is None else norms2 + term
            acts.append(a)
        assert norms2 is not None  # at least one layer: checked when the clipper was built
        c = clip_factors(np.sqrt(norms2), max_grad_norm)
        weights = torch.from_numpy((c * scale)[:, None] if scale != 1.0 else c[:, None])
        for g, a, (weight, bias) in zip(outs, acts, self._slots, strict=True):
            g.mul_(weights)  # the clipped, scaled output gradients (``outs`` are this call's own tensors)
            torch.mm(g.t(), a, out=out[weight])
            if bias is not None:
                torch.sum(g, 0, out=out[bias])
        return loss.item(), int(np.count_nonzero(c < 1))


class OpacusClipper:
    """Per-sample gradients from Opacus' ``GradSampleModule``, clipped as ``DPOptimizer`` does."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, functorch: bool = False) -> None:
        from opacus import GradSampleModule

        self.model, self.loss_fn = model, loss_fn
        self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=functorch)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def clipped_sum(self, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float
                    ) -> tuple[list[torch.Tensor], float, int]:
        """The clipped per-example gradients' sum of a batch, its mean loss and how many examples were clipped."""
        for p in self.params:
            p.grad, p.grad_sample = None, None  # type: ignore[attr-defined]
        loss = self.loss_fn(self.gsm(x), y)
        loss.backward()
        samples = [p.grad_sample for p in self.params]  # type: ignore[attr-defined]
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
        c = clip_factors(norms, max_grad_norm)
        grads = [torch.einsum("i,i...", c, g) for g in samples]
        for p in self.params:
            p.grad, p.grad_sample = None, None  # type: ignore[attr-defined]
        return grads, float(loss.detach()), int((c < 1).sum())

    def close(self) -> None:
        """Remove the per-example gradient hooks from the model."""
        self.gsm._close()


#: Parameter-free modules that act on each example independently and keep its spatial layout.
_SPATIAL_SAFE = (*_PER_SAMPLE_SAFE, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                 nn.Dropout2d, nn.GroupNorm)  # GroupNorm without affine parameters normalises within an example


def _conv_supported(conv: nn.Conv2d) -> bool:
    """An ``nn.Conv2d`` whose per-example weight gradients :func:`_conv_weight_per_example` gives."""
    return conv.groups == 1 and conv.padding_mode == "zeros" and conv.padding != "same"


def _clipped_layer(module: nn.Module) -> bool:
    """A layer with trainable parameters that :class:`LayerClipper` has a rule for."""
    if isinstance(module, nn.Conv2d) and not _conv_supported(module):
        return False
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.GroupNorm)) and any(
        True for _ in module.parameters(recurse=False))


def layers_supported(model: nn.Module) -> bool:
    """True if every parameter lives in an ``nn.Linear``, ``nn.Conv2d`` (one group, zero padding)
    or ``nn.GroupNorm`` and every other module is a parameter-free per-example operation (so
    :class:`LayerClipper` is exact)."""
    for module in model.modules():
        if module is model or _clipped_layer(module):
            continue
        if any(True for _ in module.parameters(recurse=False)) or not isinstance(module, _SPATIAL_SAFE):
            return False
    return any(_clipped_layer(m) for m in model.modules())


def _conv_weight_per_example(conv: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each example's gradient of ``conv.weight`` (rows of ``out*C*kh*kw``), from its input ``a``
    and output gradient ``g``: the batch taken as the groups of one grouped weight-gradient
    convolution (torch's backward kernel; 2-4x faster here than unfolding the input, which
    Opacus does, and no unfolded copy of the activations)."""
    b, c = a.shape[:2]
    out = g.shape[1]
    per = conv2d_weight(a.reshape(1, b * c, *a.shape[2:]), (b * out, c, *conv.kernel_size),
                        g.reshape(1, b * out, *g.shape[2:]), conv.stride,
                        0 if conv.padding == "valid" else conv.padding,  # type: ignore[arg-type]
                        conv.dilation, groups=b)
    return per.reshape(b, -1)


class LayerClipper(_RecordingClipper):
    """Exact per-sample clipping for convolutional models (the imaging CNN) from each layer's
    input and output gradient, one forward and one backward pass, as :class:`LinearClipper`
    does for linear ones; each layer type has its rule (Opacus' per-layer grad-sample rules,
    without Opacus' hooks or its per-example gradients for the large linear layers).

    Each rule:

    * ``nn.Linear`` (2-D input): the norm from ``||g_i||^2 (||a_i||^2 + 1)``, the clipped sum
      ``(c*G)^T A``: no per-example gradient (the CNN's 100k-parameter head costs nothing extra);
    * ``nn.Conv2d``: the per-example weight gradients (out x C*k*k values each, small for a
      conv kernel) from one grouped weight-gradient convolution, their norms, and the clipped
      sum as their ``c``-weighted sum;
    * ``nn.GroupNorm``: per-example ``sum(g * x_hat)`` and ``sum(g)`` per channel.

    Agrees with the per-example definition (and Opacus) up to float rounding (tested).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        if not layers_supported(model):
            raise ValueError(f"{type(model).__name__} has layers other than nn.Linear, nn.Conv2d (one group, zero "
                             "padding) and nn.GroupNorm with parameters, or a module that mixes examples")
        super().__init__(model, loss_fn, [m for m in model.modules() if m is not model and _clipped_layer(m)])

    @override
    def clipped_sum_into(self, out: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, max_grad_norm: float,
                         scale: float = 1.0) -> tuple[float, int]:
        loss, io, outs = self._forward_backward(x, y)
        norms2 = torch.zeros(x.shape[0], dtype=loss.dtype)
        parts: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # per layer: what its clipped sum is made from
        for layer, (a, _), g in zip(self.layers, io, outs, strict=True):
            a = a.detach()
            if isinstance(layer, nn.Linear):
                if a.dim() != 2:
                    raise ValueError("LayerClipper needs each nn.Linear layer called on 2-D input")
                a2 = a.pow(2).sum(1)
                if layer.bias is not None:
                    a2 += 1
                norms2 += g.pow(2).sum(1) * a2
                parts.append((g, a))
            elif isinstance(layer, nn.Conv2d):
                per = _conv_weight_per_example(layer, a, g)  # (B, out*C*k*k)
                norms2 += per.pow(2).sum(1)
                gb = g.sum((2, 3)) if layer.bias is not None else None
                if gb is not None:
                    norms2 += gb.pow(2).sum(1)
                parts.append((per, gb))
            else:  # nn.GroupNorm
                assert isinstance(layer, nn.GroupNorm)
                xhat = F.group_norm(a, layer.num_groups, eps=layer.eps)
                gc = g.reshape(g.shape[0], g.shape[1], -1)
                gw = (gc * xhat.reshape_as(gc)).sum(2)
                gb = gc.sum(2)
                norms2 += gw.pow(2).sum(1) + gb.pow(2).sum(1)
                parts.append((gw, gb))
        c = clip_factors(norms2.sqrt(), max_grad_norm)
        weights = c * scale if scale != 1.0 else c
        for layer, (first, second), (weight, bias) in zip(self.layers, parts, self._slots, strict=True):
            if isinstance(layer, nn.Linear):
                assert second is not None  # the layer's input
                g = first * weights[:, None]
                torch.mm(g.t(), second, out=out[weight])
                if bias is not None:
                    torch.sum(g, 0, out=out[bias])
                continue
            torch.mv(first.t(), weights, out=out[weight].view(-1))
            if bias is not None:
                assert second is not None  # the per-example bias gradients
                torch.mv(second.t(), weights, out=out[bias])
        return loss.item(), int((c < 1).sum())


def make_clipper(model: nn.Module, loss_fn: nn.Module, engine: str = "auto") -> Clipper:
    """The backend ``engine`` names; ``auto`` = the fast one when the model allows it
    (:class:`LinearClipper` for linear models, :class:`LayerClipper` for convolutional ones),
    else Opacus' hooks."""
    if engine not in ENGINES:
        raise ValueError(f"privacy.engine={engine!r} is invalid: allowed one of {list(ENGINES)}")
    if engine in ("fast", "auto"):
        if linear_supported(model):
            return LinearClipper(model, loss_fn)
        if layers_supported(model) or engine == "fast":
            return LayerClipper(model, loss_fn)
    return OpacusClipper(model, loss_fn, functorch=engine == "functorch")

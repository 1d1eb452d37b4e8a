"""One private optimiser step: clipped per-example gradients, their sum noised, divided by the expected batch."""

from __future__ import annotations

import torch
from torch import nn

from privacy.clipping import LayerClipper, LinearClipper, make_clipper
from privacy.dpsgd.config import DPSGDParams
from tasks.training import loss_fn


class PrivateStep:
    """Sets ``p.grad`` of every trainable parameter to one batch's privatised gradient:
    ``(sum_i clip(g_i) + N(0, (sigma*C)^2 I)) / (q*n)``; the caller steps the optimiser.
    The noise comes from ``generator``."""

    def __init__(self, model: nn.Module, params: DPSGDParams, rows: int, generator: torch.Generator,
                 loss: str = "binary") -> None:
        self.clipper = make_clipper(model, loss_fn(loss, reduction="sum"), params.engine)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sizes = [p.numel() for p in self.params]
        self.max_grad_norm, self.generator = params.max_grad_norm, generator
        self.scale = 1.0 / (params.sample_rate * rows)
        self.noise_scale = params.noise_multiplier * params.max_grad_norm * self.scale
        # one flat gradient buffer and one noise buffer, reused every step: the clipped sum is
        # written into views of ``flat`` and the noise added in one operation
        dtype = self.params[0].dtype if self.params else torch.float32
        self.flat = torch.empty(sum(self.sizes), dtype=dtype)
        self.noise = torch.empty(sum(self.sizes), dtype=dtype)
        self.views = [v.view_as(p) for v, p in zip(self.flat.split(self.sizes), self.params, strict=True)]
        self.fused = isinstance(self.clipper, (LinearClipper, LayerClipper))  # writes its clipped sum into ``views``
        self._grads_set = False

    def set_grads(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """Returns (summed loss of the batch, examples clipped)."""
        if x.shape[0] and self.fused:  # scaling folded into the clip factors
            loss, n_clipped = self.clipper.clipped_sum_into(  # type: ignore[attr-defined]  # a fused clipper
                self.views, x, y, self.max_grad_norm, self.scale)
        elif x.shape[0]:
            grads, loss, n_clipped = self.clipper.clipped_sum(x, y, self.max_grad_norm)
            for v, g in zip(self.views, grads, strict=True):
                torch.mul(g, self.scale, out=v)
        else:  # an empty Poisson batch is still a step: noise only
            self.flat.zero_()
            loss, n_clipped = 0.0, 0
        if self.noise_scale > 0:
            self.flat.add_(self.noise.normal_(generator=self.generator), alpha=self.noise_scale)
        if not self._grads_set:  # every p.grad is its view of ``flat`` (the optimiser only reads it); the
            for p, v in zip(self.params, self.views, strict=True):  # Opacus clipper resets p.grad each step
                p.grad = v
            self._grads_set = self.fused
        return loss, n_clipped

    def close(self) -> None:
        """Remove the per-example gradient hooks from the model."""
        self.clipper.close()

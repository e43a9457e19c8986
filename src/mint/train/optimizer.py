"""AdamW over one policy's own tensors, written out so it is exact and serialisable.

The update is the one `torch.optim.AdamW` performs (bias-corrected moments, decoupled weight
decay) and gradient clipping follows `torch.nn.utils.clip_grad_norm_`; the moments live in
the policy's training state, never in an optimizer object shared between policies.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from mint.train.types import AdamParams

log = logging.getLogger(__name__)

#: Added to the norm before dividing, as `clip_grad_norm_` does, so a zero norm is harmless.
CLIP_EPS = 1e-6


def global_grad_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients taken together, as a 0-d float32 tensor."""
    norms = [torch.linalg.vector_norm(grad.float()) for grad in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


@torch.no_grad()
def clip_(grads: Sequence[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale `grads` in place so their global norm is at most `max_norm` (0 = no clip)."""
    if max_norm <= 0:
        return
    coefficient = torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)
    for grad in grads:
        grad.mul_(coefficient.to(grad.dtype))


@torch.no_grad()
def adamw_step_(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avg: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor],
    step: int,
    params: AdamParams,
) -> None:
    """Apply AdamW step number `step` (counted from 1) to `weights` and moments, in place."""
    lr, beta1, beta2 = params.learning_rate, params.beta1, params.beta2
    step_size = lr / (1.0 - beta1**step)
    root_correction2 = math.sqrt(1.0 - beta2**step)
    for weight, grad, m, v in zip(weights, grads, exp_avg, exp_avg_sq, strict=True):
        # 1. Decoupled decay shrinks the weight before the Adam direction is applied.
        if params.weight_decay:
            weight.mul_(1.0 - lr * params.weight_decay)
        # 2. Moving averages of the gradient and its square.
        m.lerp_(grad, 1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        # 3. Bias-corrected step; eps is added after the square-root correction.
        denominator = (v.sqrt() / root_correction2).add_(params.eps)
        weight.addcdiv_(m, denominator, value=-step_size)

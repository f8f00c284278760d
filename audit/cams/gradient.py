"""The gradient CAM methods: one forward, one gradient w.r.t. the CAM layer's activation per target.

Each equals pytorch-grad-cam 1.5.7's definition (same epsilons), so the tests can pin it there. Each is a
sum over channels of per-channel terms (``terms``: (P, C, h, w)); ``compute`` sums them. The engine also
reads the terms to tell a map from rounding noise: where the terms cancel to within float32 rounding (a
layer followed by a per-position LayerNorm, which is scale invariant, gives sum_c g_c A_c = 0 exactly),
the map is zero, not the noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from audit.cams import CamContext, register


class _ChannelSum:
    """A map that is the channel sum of per-channel terms."""

    def compute(self, activation: torch.Tensor, gradient: torch.Tensor | None, context: CamContext) -> torch.Tensor:
        return self.terms(activation, gradient, context).sum(dim=1)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class GradCAM(_ChannelSum):
    """Selvaraju et al. 2017: channel weights = spatial mean of the gradient."""

    name: str = "gradcam"
    needs_gradient: bool = True
    description: str = "Grad-CAM: channels weighted by their mean gradient"

    def terms(self, activation: torch.Tensor, gradient: torch.Tensor, context: CamContext) -> torch.Tensor:
        return gradient.mean(dim=(2, 3), keepdim=True) * activation


@dataclass(frozen=True)
class GradCAMPlusPlus(_ChannelSum):
    """Chattopadhyay et al. 2018, eq. 19 with exponential scores (pytorch-grad-cam's reading).

    alpha = g^2 / (2 g^2 + sum_ab(A) g^3), zero where g == 0; weights = sum_ij alpha * ReLU(g).
    (torchcam 0.5.0 differs: its alpha is never divided, a copy is divided in place.)
    """

    name: str = "gradcam++"
    needs_gradient: bool = True
    description: str = "Grad-CAM++: positive gradients weighted by second/third-order terms"

    def terms(self, activation: torch.Tensor, gradient: torch.Tensor, context: CamContext) -> torch.Tensor:
        g2 = gradient * gradient
        g3 = g2 * gradient
        sum_activation = activation.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + sum_activation * g3 + 1e-6)
        alpha = torch.where(gradient != 0, alpha, torch.zeros_like(alpha))
        weights = (torch.relu(gradient) * alpha).sum(dim=(2, 3), keepdim=True)
        return weights * activation


@dataclass(frozen=True)
class XGradCAM(_ChannelSum):
    """Fu et al. 2020 (axiom-based): weights = sum(g * A) / sum(A) per channel."""

    name: str = "xgradcam"
    needs_gradient: bool = True
    description: str = "XGrad-CAM: gradients weighted by the normalised activation"

    def terms(self, activation: torch.Tensor, gradient: torch.Tensor, context: CamContext) -> torch.Tensor:
        sum_activation = activation.sum(dim=(2, 3), keepdim=True)
        weights = (gradient * activation / (sum_activation + 1e-7)).sum(dim=(2, 3), keepdim=True)
        return weights * activation


@dataclass(frozen=True)
class HiResCAM(_ChannelSum):
    """Draelos & Carin 2020: the element-wise product g * A summed over channels (no spatial averaging)."""

    name: str = "hirescam"
    needs_gradient: bool = True
    description: str = "HiResCAM: element-wise gradient x activation"

    def terms(self, activation: torch.Tensor, gradient: torch.Tensor, context: CamContext) -> torch.Tensor:
        return gradient * activation


@dataclass(frozen=True)
class LayerCAM(_ChannelSum):
    """Jiang et al. 2021: ReLU(g) * A summed over channels."""

    name: str = "layercam"
    needs_gradient: bool = True
    description: str = "LayerCAM: element-wise positive gradient x activation"

    def terms(self, activation: torch.Tensor, gradient: torch.Tensor, context: CamContext) -> torch.Tensor:
        return torch.relu(gradient) * activation


for _method in (GradCAM(), GradCAMPlusPlus(), XGradCAM(), HiResCAM(), LayerCAM()):
    register(_method)

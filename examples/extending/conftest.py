"""Extending model-audit from a conftest.py: a check kind, a CAM method and a model of your own.

Everything enters through two pytest hooks (see the README, "Extending model-audit"); the spec
(`extending.yaml`) only names what is registered here, it never names Python objects.
"""
from __future__ import annotations

import torch
from torch import nn

from audit.checks import CheckResult, Metric
from audit.kinds import CheckKind
from audit.models import ProvidedModel


# -- 1. a check kind: the model must be decisive (top-1 probability ahead of the runner-up) ----------------
class MarginKind(CheckKind):
    """``margin: {min: 0.3}``: p(top-1) - p(top-2) must be at least ``min``; item ``<case>::margin``."""

    name = "margin"
    key = "margin"
    schema = {"type": "object", "additionalProperties": False, "required": ["min"],
              "properties": {"min": {"type": "number", "minimum": 0, "maximum": 1,
                                     "description": "smallest allowed p(top-1) - p(top-2)"}}}

    def parse(self, raw, ctx):
        return float(raw["min"]) if raw else None

    def check(self, prepared, observation):
        first, second = observation.explanation.top_k[:2]
        margin = first.prob - second.prob
        ok = margin >= prepared
        message = (f"margin {first.label} {first.prob:.2f} - {second.label} {second.prob:.2f} = {margin:.2f}"
                   f" {'>=' if ok else '<'} {prepared:.2f}")
        return CheckResult(self.name, ok, message, (Metric("margin", margin, prepared, ">=", ok),))


# -- 2. a CAM method: Eigen-CAM (the first principal component of the activations; no gradient) -----------
class EigenCAM:
    """Eigen-CAM (Muhammad & Yeasin, 2020): project each location's activation vector on the first
    principal component of the layer's activations. Class-agnostic and gradient-free."""

    name = "eigencam"
    needs_gradient = False

    def compute(self, activation, gradient, context):
        b, c, h, w = activation.shape
        flat = activation.reshape(b, c, h * w).transpose(1, 2)               # (B, hw, C)
        flat = flat - flat.mean(dim=1, keepdim=True)
        _, _, vh = torch.linalg.svd(flat, full_matrices=False)
        projection = flat @ vh[:, 0, :].unsqueeze(-1)                        # (B, hw, 1)
        maps = projection.reshape(b, h, w)
        # the sign of a principal component is arbitrary: keep the orientation whose mass is positive
        sign = torch.where(maps.sum(dim=(1, 2), keepdim=True) >= 0, 1.0, -1.0)
        return maps * sign


# -- 3. a model: the shipped shapes network behind a preprocessing layer of our own ------------------------
class Blurred(nn.Module):
    """A user's model: a fixed 3x3 box blur in front of the zoo's shapes_vgg (weights loaded from the zoo)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.blur = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)
        with torch.no_grad():
            self.blur.weight.fill_(1.0 / 9.0)
        self.features = inner.features
        self.avgpool = inner.avgpool
        self.classifier = inner.classifier

    def forward(self, x):
        x = self.features(self.blur(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def pytest_audit_register(registry):
    registry.add_check_kind(MarginKind())
    registry.add_cam_method(EigenCAM())


def pytest_audit_make_model(model, device):
    if model.arch != "blurred_shapes":
        return None
    from audit.zoo import ZOO

    entry = ZOO["shapes_vgg"]
    inner = entry.build()
    inner.load_state_dict(torch.load(entry.weights_path, map_location="cpu", weights_only=True))
    return ProvidedModel(Blurred(inner), categories=entry.categories, input_size=entry.input_size,
                         mean=entry.mean, std=entry.std, source="conftest.py: Blurred(shapes_vgg)")

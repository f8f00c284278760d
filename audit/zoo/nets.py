"""The zoo's network: a small VGG laid out like torchvision's, so the product treats it like one.

Module names follow ``torchvision.models.VGG`` (``features`` / ``avgpool`` / ``classifier``), so the
engine's default CAM rule (the last ReLU in ``features``) picks the right layer without a special
case. Two pools only: for a 64 px input the last ReLU gives a 16x16 map, fine enough for Grad-CAM to
land on a 16-30 px object. Global average pooling before a single linear layer makes Grad-CAM equal
to the class activation map of the model, which is what localises well.
"""
from __future__ import annotations

import torch
from torch import Tensor, flatten, nn

from audit.zoo.scenes import CLASSES

WIDTHS: tuple[int, ...] = (16, 32, 64)


def _block(c_in: int, c_out: int, dilations: tuple[int, ...], batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, d in enumerate(dilations):
        layers.append(nn.Conv2d(c_in if i == 0 else c_out, c_out, kernel_size=3, padding=d, dilation=d))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
    return layers


class ShapesVGG(nn.Module):
    """VGG-style classifier for 64x64 shape scenes (about 100k parameters)."""

    def __init__(self, num_classes: int = len(CLASSES), widths: tuple[int, ...] = WIDTHS,
                 batch_norm: bool = False):
        super().__init__()
        w1, w2, w3 = widths
        self.widths = tuple(widths)
        bn = batch_norm
        # Dilated convs in the last stage: a receptive field over the whole object, so the evidence
        # (and the Grad-CAM peak) sits on the object instead of just outside its boundary.
        self.features = nn.Sequential(
            *_block(3, w1, (1,), bn), nn.MaxPool2d(2),
            *_block(w1, w2, (1, 1), bn), nn.MaxPool2d(2),
            *_block(w2, w3, (1, 2, 2), bn),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.1), nn.Linear(w3, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's VGG init: without it the signal fades through seven plain convs and
        # training sits at chance level.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(flatten(x, 1))


def fold_batch_norm(trained: ShapesVGG) -> ShapesVGG:
    """The plain (conv/ReLU/MaxPool) network computing what ``trained`` (with BatchNorm) computes in eval.

    Training uses BatchNorm because plain VGG sits at chance level for hundreds of steps on these
    scenes; shipping the folded network keeps the zoo's architecture exactly torchvision-VGG-like.
    """
    plain = ShapesVGG(num_classes=trained.classifier[-1].out_features, widths=trained.widths,
                      batch_norm=False)
    convs = [m for m in trained.features if isinstance(m, nn.Conv2d)]
    norms = [m for m in trained.features if isinstance(m, nn.BatchNorm2d)]
    targets = [m for m in plain.features if isinstance(m, nn.Conv2d)]
    if len(norms) != len(convs):
        raise ValueError("fold_batch_norm needs one BatchNorm2d after every Conv2d")
    with torch.no_grad():
        for conv, bn, out in zip(convs, norms, targets):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            out.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            out.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
        plain.classifier.load_state_dict(trained.classifier.state_dict())
    return plain


def shapes_vgg(num_classes: int = len(CLASSES)) -> ShapesVGG:
    """Random-init architecture shared by ``shapes_vgg`` and ``shapes_vgg_shortcut``."""
    return ShapesVGG(num_classes=num_classes)

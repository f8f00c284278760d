"""Score-CAM (Wang et al. 2020): channel weights from the class score of the input masked by each channel.

No gradient: for each image and each channel k, the channel's map is upsampled to the input (bilinear,
corners aligned), min-max scaled to [0, 1], multiplied into the input and scored; the weights are the
softmax over channels of those class scores (pytorch-grad-cam's definition). The masked forwards are
batched across images AND channels (``context.chunk`` at a time), and every requested class of an image
reads the same forwards. A channel whose upsampled map is constant masks the input to exactly zero, so
all of them share one forward of a zero input instead of one each (the same numbers, fewer forwards).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from audit.cams import CamContext, register


@dataclass(frozen=True)
class ScoreCAM:
    name: str = "scorecam"
    needs_gradient: bool = False
    description: str = "Score-CAM: channels weighted by the class score of the masked input (no gradient)"

    def compute(self, activation: torch.Tensor, gradient: torch.Tensor | None, context: CamContext) -> torch.Tensor:
        first_row: dict[int, int] = {}
        for row, image in enumerate(context.image_of_row):
            first_row.setdefault(image, row)
        scores = _masked_scores(activation, first_row, context)
        maps = []
        for row, (image, cls) in enumerate(zip(context.image_of_row, context.class_of_row)):
            weights = torch.softmax(scores[image][:, cls].float(), dim=0)
            maps.append((weights[:, None, None] * activation[row]).sum(dim=0))
        return torch.stack(maps)


def _masked_scores(activation: torch.Tensor, first_row: dict[int, int], context: CamContext) -> dict[int, torch.Tensor]:
    """Logits (C, K) of every image's C masked inputs, from forwards of ``context.chunk`` masked inputs."""
    inputs = context.inputs
    size = tuple(inputs.shape[-2:])
    channels = activation.shape[1]
    jobs = [(image, k) for image in first_row for k in range(channels)]
    results: dict[int, list[torch.Tensor | None]] = {image: [None] * channels for image in first_row}
    zero_logits: torch.Tensor | None = None
    for start in range(0, len(jobs), max(1, context.chunk)):
        chunk = jobs[start:start + context.chunk]
        rows = torch.tensor([first_row[image] for image, _ in chunk], device=activation.device)
        ks = torch.tensor([k for _, k in chunk], device=activation.device)
        maps = activation[rows, ks][:, None]                              # (n, 1, h, w)
        up = F.interpolate(maps, size=size, mode="bilinear", align_corners=True)
        flat = up.flatten(1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        masks = (up - lo[:, None, None, None]) / (hi - lo + 1e-8)[:, None, None, None]
        varying = (hi != lo).nonzero().flatten()
        if len(varying) < len(chunk) and zero_logits is None:
            zero_logits = context.score(torch.zeros_like(inputs[:1]))[0]
        logits = None
        if len(varying):
            images = torch.tensor([chunk[i][0] for i in varying.tolist()], device=inputs.device)
            logits = context.score(inputs[images] * masks[varying])
        position = {int(i): j for j, i in enumerate(varying.tolist())}
        for i, (image, k) in enumerate(chunk):
            results[image][k] = logits[position[i]] if i in position else zero_logits
    return {image: torch.stack(rows) for image, rows in results.items()}  # type: ignore[arg-type]


register(ScoreCAM())

"""Class probabilities of many images through a loaded model: the ``predict`` the deletion/insertion
curves (:mod:`audit.faithfulness`) stream their steps through.

A separate module because the curves are torch-free and the engine is about one explaining forward:
this is the plain, no-grad, batched forward with the model's own preprocessing, nothing else.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

from audit.models import LoadedModel


def predictor(loaded: LoadedModel, preprocess: str = "squash", batch_size: int = 64
              ) -> Callable[[list[Image.Image]], np.ndarray]:
    """A ``predict(images) -> probs (n, classes)`` for ``loaded`` with its ``preprocess`` transform."""
    prep = loaded.preprocessing[preprocess]
    module = loaded.module

    def predict(images: list[Image.Image]) -> np.ndarray:
        out = []
        training = module.training
        try:
            module.eval()
            with torch.no_grad():
                for start in range(0, len(images), batch_size):
                    chunk = images[start:start + batch_size]
                    batch = torch.stack([prep.to_tensor(im.convert("RGB"))[0] for im in chunk]).to(loaded.device)
                    out.append(torch.softmax(module(batch).float(), dim=1).cpu().numpy())
        finally:
            module.train(training)
        return np.concatenate(out) if out else np.zeros((0, 0))

    return predict

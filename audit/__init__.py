"""model-audit: audit image classifiers with pytest.

The public API is small and stable: ``load_model`` returns an object whose ``explain`` runs one
forward pass per batch and returns one ``Explanation`` per image (top-k, Grad-CAM, feature maps).
"""
from audit.errors import (AuditError, ImageError, ModelError, SpecError, UnknownNameError,
                          WeightsUnavailable)

__version__ = "0.1.0"

__all__ = ["load_model", "AuditError", "ImageError", "ModelError", "SpecError", "UnknownNameError",
           "WeightsUnavailable", "__version__"]


def load_model(*args, **kwargs):
    """Load a model (torchvision name, zoo name or checkpoint) and wrap it in the explanation engine.

    See :func:`audit.models.load` for the arguments; the result is an :class:`audit.engine.Engine`.
    """
    from audit.engine import Engine
    from audit.models import load

    return Engine(load(*args, **kwargs))

"""model-audit's pytest hooks: how a user's ``conftest.py`` extends the product (pytest-html's idiom).

Users' code enters through these hooks only, never through YAML: a spec can name a check kind, a CAM
method or a model that a conftest registered, but it cannot name Python objects.
"""
from __future__ import annotations

from typing import Any

import pytest


@pytest.hookspec
def pytest_audit_register(registry: Any) -> None:
    """Add check kinds, CAM methods, case sources or models to this session's ``audit.registry.Registry``.

    Called once per session (and per xdist worker) before any spec is collected::

        def pytest_audit_register(registry):
            registry.add_check_kind(MarginKind())       # an audit.kinds.CheckKind
            registry.add_cam_method(EigenCAM())         # see audit.cams
            registry.add_model("tiny_net", build_tiny)  # arch: tiny_net -> build_tiny(model_spec, device)
    """


@pytest.hookspec(firstresult=True)
def pytest_audit_make_model(model: Any, device: str) -> Any:
    """Build the model a spec names (``model.arch``, an ``audit.spec.ModelSpec``) with your own code.

    Return a ``torch.nn.Module`` or an ``audit.models.ProvidedModel`` (module + class names +
    preprocessing), or None to leave the spec to the built-in loaders (torchvision, timm, zoo,
    checkpoints). Not called for specs with a ``checkpoint:``.
    """

"""The library versions a run or a baseline records, read without importing torch."""
from __future__ import annotations

import platform
import sys
from importlib import metadata


def library_versions(python: bool = False) -> dict[str, str]:
    """torch / torchvision / model-audit versions (the loaded module's, else the package metadata);
    with ``python``, the interpreter's too."""
    from audit import __version__

    out: dict[str, str] = {}
    for name in ("torch", "torchvision"):
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None) if module is not None else None
        if version is None:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                version = "not installed"
        out[name] = str(version)
    out["model_audit"] = __version__
    if python:
        out["python"] = platform.python_version()
    return out

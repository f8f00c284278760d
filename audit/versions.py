"""The library versions a run or a baseline records, read without importing torch."""
from __future__ import annotations

import platform
import sys
from importlib import metadata


def library_versions(python: bool = False) -> dict[str, str]:
    """torch / torchvision / model-audit versions (the installed package's metadata, else the loaded
    module's); with ``python``, the interpreter's too.

    The metadata comes first because it does not depend on what this process imported: a module's
    ``__version__`` can carry a local suffix its metadata lacks (torchvision's ``0.29.1+cu130`` against
    ``0.29.1``), and an xdist controller, which never imports torchvision, would record another version
    than a serial run of the same install.
    """
    from audit import __version__

    out: dict[str, str] = {}
    for name in ("torch", "torchvision"):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = getattr(sys.modules.get(name), "__version__", None) or "not installed"
        out[name] = str(version)
    out["model_audit"] = __version__
    if python:
        out["python"] = platform.python_version()
    return out

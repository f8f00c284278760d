"""Repo-level test configuration: fixtures every test folder may use, and the pytester plugin."""
from __future__ import annotations

from pathlib import Path

import pytest

# pytester's in-process runs restore sys.modules afterwards; a C extension such as torch imported for the
# first time inside such a run would be imported again by the next one and crash the interpreter.
# Importing the heavy modules here keeps them in the snapshot that pytester restores.
import cv2  # noqa: E402,F401
import torch  # noqa: E402,F401
import torchvision  # noqa: E402,F401

import audit.engine  # noqa: E402,F401
import audit.report  # noqa: E402,F401
import audit.zoo  # noqa: E402,F401

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def grace_hopper_path() -> Path:
    """A real photograph that ships with matplotlib (no download needed)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    assert path.is_file(), f"matplotlib's sample photo is missing: {path}"
    return path

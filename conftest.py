"""Repo-level test configuration: fixtures every test folder may use, and the pytester plugin."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def grace_hopper_path() -> Path:
    """A real photograph that ships with matplotlib (no download needed)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    assert path.is_file(), f"matplotlib's sample photo is missing: {path}"
    return path

"""The interpreter every benchmark's fresh processes run in: as on a user's machine.

Python writes bytecode caches on a user's machine. A sandbox that sets ``PYTHONDONTWRITEBYTECODE``
(this project's development machine does) makes each fresh process compile again everything it
imports without a cache: pytest's assertion rewriting of the dev environment's pytest plugins alone
(hypothesis, anyio, xdist: 112 modules, ~1.5 s of a 6 s `pytest` run measured with cProfile) and
model-audit's own modules from an editable install. That cost belongs to the sandbox, not to
model-audit, and it lands on one side of a ratio only (the bare baseline loads no pytest plugin).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def as_on_a_users_machine(spec: Path) -> None:
    """Let child processes write bytecode caches, and write them once by collecting ``spec``."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", spec.name],
                   cwd=spec.parent, capture_output=True, check=False)

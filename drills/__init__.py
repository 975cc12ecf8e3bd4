"""Reliability and security drills (issue 7): one module per drill, each run with `python drills/run.py <name>`.

Not installed with cptflow and never imported with the checkout root on sys.path (its kernels/ folder
would shadow Hugging Face's `kernels`): drills/run.py and tests/conftest.py register this folder as the
package `drills` by its path.
"""

import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parent / "run.py"


def drill_command(name: str, *args: str) -> list[str]:
    """The command line that runs drill `name` (a module of this folder) in a child process."""
    return [sys.executable, str(RUNNER), name, *args]

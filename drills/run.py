"""Run one drill: `python drills/run.py kill --quick` runs drills/kill.py as the module drills.kill.

Python puts this folder, not the checkout root, on sys.path: the root's kernels/ folder must not shadow
Hugging Face's `kernels`. So the folder is registered as the package `drills` by its path.
"""

import importlib.util
import runpy
import sys
from pathlib import Path


def register_drills_package() -> None:
    folder = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location(
        "drills", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["drills"] = module
    spec.loader.exec_module(module)


if __name__ == "__main__":
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python drills/run.py {kill,concurrency,hostile_input,security} [ARGS]")
    register_drills_package()
    name = sys.argv.pop(1)
    sys.argv[0] = f"drills/run.py {name}"
    runpy.run_module(f"drills.{name}", run_name="__main__", alter_sys=True)

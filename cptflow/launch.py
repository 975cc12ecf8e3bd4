"""One rank of a training stage: `python -m cptflow.launch --spec FILE`, started by torchrun or
`accelerate launch` (cptflow/training_process.py starts and watches the tree). Rank 0 reports progress
as marked lines on stdout; the other ranks stay silent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from cptflow import distributed
from cptflow.config import PipelineConfig
from cptflow.plan import StageRun, stage_module
from cptflow.store import read_json
from cptflow.training_process import EVENT_MARKER, write_error


class EventReporter:
    """Rank 0's reporter: every call becomes one marked JSON line on stdout for the parent."""

    def _emit(self, name: str, *args) -> None:
        # One write per event line: another rank's output cannot land inside it.
        sys.stdout.write(EVENT_MARKER + json.dumps({"event": name, "args": list(args)}, default=str) + "\n")
        sys.stdout.flush()

    def on_start(self, info: dict) -> None:
        self._emit("on_start", info)

    def on_log(self, record: dict) -> None:
        self._emit("on_log", record)

    def on_eval(self, step: int, results: dict) -> None:
        self._emit("on_eval", step, results)

    def on_checkpoint(self, path: Path, best: Path | None) -> None:
        self._emit("on_checkpoint", str(path), str(best) if best else None)


class QuietReporter:
    """Ranks other than 0 stay silent: rank 0 speaks for all."""

    def on_start(self, info: dict) -> None: ...
    def on_log(self, record: dict) -> None: ...
    def on_eval(self, step: int, results: dict) -> None: ...
    def on_checkpoint(self, path: Path, best: Path | None) -> None: ...


def quiet_library_warnings() -> None:
    """Every training stage is a fresh process, so each one would repeat transformers', peft's and
    torch's deprecation warnings into the run log: they are ours to act on, not the user's. Set
    CPTFLOW_LIBRARY_WARNINGS=1 to see them."""
    if os.environ.get("CPTFLOW_LIBRARY_WARNINGS") == "1":
        return
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings(
            "ignore", category=category, module=r"(transformers|peft|torch|accelerate|bitsandbytes)(\..*)?$"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cptflow.launch",
        description="One rank of a cptflow training stage (started by torchrun or accelerate launch).",
    )
    parser.add_argument("--spec", required=True, help="launch.json written by the flow")
    args = parser.parse_args(argv)
    quiet_library_warnings()
    spec = read_json(Path(args.spec))
    distributed.init_from_environment()
    rank = distributed.rank()
    prefix = f"[rank {rank}] " if distributed.world_size() > 1 else ""
    logging.basicConfig(
        level=logging.INFO, format=f"{prefix}%(levelname)s %(name)s: %(message)s", stream=sys.stdout, force=True
    )
    cfg = PipelineConfig.model_validate({**spec["config"], "base_dir": spec["base_dir"]})
    run = StageRun(**spec["run"])
    reporter = EventReporter() if distributed.is_main() else QuietReporter()
    try:
        stage_module(spec["stage"]).run(run, cfg, reporter=reporter)
    except Exception as error:  # recorded for the parent, then raised as ever (the traceback goes to the log)
        write_error(run.path, rank, error)
        raise
    distributed.shutdown()  # on an error there is no barrier to wait at: torchrun stops the other ranks
    return 0


if __name__ == "__main__":
    sys.exit(main())

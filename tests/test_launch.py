"""The training launcher's process tree: output streamed line by line, events delivered, and no process
left behind after a timeout or a SIGTERM to the launching process (what a cancelled Prefect run gets)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cptflow.training_process import (
    EVENT_MARKER,
    TrainingProcessError,
    TrainingTimeout,
    deliver_event,
    launch_command,
    run_process_tree,
)

REPO = Path(__file__).resolve().parents[1]

# A process that starts a grandchild (like torchrun starting its workers), records both pids, then waits.
TREE = textwrap.dedent(
    """
    import os, subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-P", "-c", "import time; time.sleep(600)"])
    with open(sys.argv[1], "w") as handle:
        handle.write(f"{os.getpid()} {grandchild.pid}")
    print("workers up", flush=True)
    time.sleep(600)
    """
)

# Like torchrun's workers: the grandchild has a session of its own (a group signal misses it) and
# ignores SIGTERM (hung in a collective), so only SIGKILL to it, found as a descendant, ends it.
STUBBORN_TREE = TREE.replace(
    'grandchild = subprocess.Popen([sys.executable, "-P", "-c", "import time; time.sleep(600)"])',
    (
        'grandchild = subprocess.Popen([sys.executable, "-P", "-c", '
        '"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"], '
        "start_new_session=True)"
    ),
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().split(") ")[1][0] != "Z"


def wait_for(path: Path, seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.1)
    return path.read_text()


def test_output_is_streamed_line_by_line_and_events_reach_the_reporter():
    script = textwrap.dedent(
        f"""
        import json, sys, time
        print("first", flush=True)
        sys.stderr.write("progress 10%\\rprogress 20%\\n"); sys.stderr.flush()
        sys.stdout.write({EVENT_MARKER!r} + json.dumps({{"event": "on_log", "args": [{{"step": 1}}]}}) + "\\n")
        sys.stdout.flush()
        print("last", flush=True)
        """
    )
    lines, received = [], []
    times = []

    def on_line(line: str) -> None:
        lines.append(line)
        times.append(time.monotonic())

    run_process_tree([sys.executable, "-P", "-c", script], on_line=on_line)
    assert lines[0] == "first" and lines[-1] == "last"
    assert "progress 10%" in lines and "progress 20%" in lines  # carriage returns end lines too

    class Reporter:
        def on_log(self, record):
            received.append(record)

    import json

    event = next(line for line in lines if line.startswith(EVENT_MARKER))
    deliver_event(Reporter(), json.loads(event[len(EVENT_MARKER) :]))
    assert received == [{"step": 1}]


def test_a_failing_process_raises_with_its_last_lines():
    with pytest.raises(TrainingProcessError, match=r"exited with code 3(.|\n)*CUDA out of memory"):
        run_process_tree(
            [sys.executable, "-P", "-c", "print('CUDA out of memory'); raise SystemExit(3)"], on_line=lambda line: None
        )


def test_a_timeout_kills_the_whole_process_tree_even_workers_in_their_own_session(tmp_path):
    assert STUBBORN_TREE != TREE
    pids = tmp_path / "pids"
    started = time.monotonic()
    with pytest.raises(TrainingTimeout, match="timeout"):
        run_process_tree(
            [sys.executable, "-P", "-c", STUBBORN_TREE, str(pids)], on_line=lambda line: None, timeout_seconds=3
        )
    assert time.monotonic() - started < 30
    child, grandchild = map(int, pids.read_text().split())
    assert not alive(child) and not alive(grandchild)


def test_sigterm_to_the_launching_process_kills_the_whole_process_tree(tmp_path):
    """Prefect's runner cancels a flow run by sending its process SIGTERM: the training tree must die with it."""
    pids = tmp_path / "pids"
    launcher = textwrap.dedent(
        f"""
        import sys
        from cptflow.training_process import run_process_tree
        run_process_tree([sys.executable, "-P", "-c", {TREE!r}, {str(pids)!r}], on_line=print)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-P", "-c", launcher], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    child, grandchild = map(int, wait_for(pids).split())
    assert alive(child) and alive(grandchild)
    parent.send_signal(signal.SIGTERM)
    output = parent.communicate(timeout=60)[0]
    assert parent.returncode != 0 and "TrainingCancelled" in output
    deadline = time.monotonic() + 15
    while (alive(child) or alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child) and not alive(grandchild)


def test_a_sigkilled_launching_process_still_takes_the_launcher_down(tmp_path):
    """Not even a chance to clean up: the kernel sends the launcher SIGTERM (PR_SET_PDEATHSIG)."""
    pids = tmp_path / "pids"
    launcher = (
        "from cptflow.training_process import run_process_tree; import sys; "
        f"run_process_tree([sys.executable, '-c', {TREE!r}, {str(pids)!r}], on_line=print)"
    )
    parent = subprocess.Popen([sys.executable, "-P", "-c", launcher], cwd=REPO, stdout=subprocess.DEVNULL)
    child, _ = map(int, wait_for(pids).split())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 15
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)


def test_launch_commands_for_torchrun_and_accelerate(tmp_path):
    from cptflow.config import PipelineConfig

    def config(**launch):
        return PipelineConfig(
            name="x",
            base_model="m",
            sources=[{"name": "d", "role": "domain", "paths": ["in"]}],
            launch=launch,
            base_dir=str(tmp_path),
        )

    spec = tmp_path / "launch.json"
    torchrun = launch_command(config(launcher="torchrun", num_processes=4), spec, 4)
    assert (
        torchrun[:3] == [sys.executable, "-m", "torch.distributed.run"]
        and "--nproc-per-node=4" in torchrun
        and "--standalone" in torchrun
    )
    assert torchrun[-4:] == ["-m", "cptflow.launch", "--spec", str(spec)]
    accelerate = launch_command(config(launcher="accelerate", num_processes=2, accelerate_config="acc.yaml"), spec, 2)
    assert accelerate[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert (
        "--num_processes=2" in accelerate and "--multi_gpu" in accelerate and str(tmp_path / "acc.yaml") in accelerate
    )
    with pytest.raises(ValueError, match="inline"):
        config(launcher="inline", num_processes=2)


def test_library_deprecation_warnings_stay_out_of_the_run_log(monkeypatch):
    """Each training stage is a fresh process: transformers' FutureWarnings would repeat in every run
    log. They are filtered in the child; ours are not; CPTFLOW_LIBRARY_WARNINGS=1 shows them all."""
    import warnings

    from cptflow.launch import quiet_library_warnings

    def shown(module: str) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_library_warnings()
            for category in (FutureWarning, DeprecationWarning):
                warnings.warn_explicit("old api", category, filename="x.py", lineno=1, module=module)
        return [type(w.message).__name__ for w in caught]

    monkeypatch.delenv("CPTFLOW_LIBRARY_WARNINGS", raising=False)
    assert shown("transformers.modeling_utils") == [] and shown("peft.tuners.lora") == []
    assert shown("cptflow.training") == ["FutureWarning", "DeprecationWarning"]
    monkeypatch.setenv("CPTFLOW_LIBRARY_WARNINGS", "1")
    assert shown("transformers.modeling_utils") == ["FutureWarning", "DeprecationWarning"]


def test_each_line_keeps_the_level_the_training_process_logged_it_with():
    """WARNING stays WARNING and ERROR stays ERROR in the run log; a traceback is ERROR throughout."""
    import logging

    from cptflow.training_process import LineLevels

    level_of = LineLevels()
    lines = [
        ("INFO cptflow.training: step 5/10 loss 3.2", logging.INFO),
        ("WARNING cptflow.training: lora.target_modules leaves out ['o_proj']", logging.WARNING),
        ("  the second line of that warning", logging.WARNING),
        ("[rank 1] ERROR cptflow.tasks.sft: no usable training example", logging.ERROR),
        ("[rank 0] INFO cptflow.training: eval at step 10", logging.INFO),
        ("/x/peft/tuners/lora.py:12: UserWarning: fan_in_fan_out is set", logging.WARNING),
        ("Traceback (most recent call last):", logging.ERROR),
        ('  File "/x/cptflow/tasks/sft.py", line 3, in run', logging.ERROR),
        ("cptflow.tasks.sft.SftDataError: no usable training example", logging.ERROR),
        ("INFO torch.distributed: shutting down", logging.INFO),
    ]
    assert [level_of(line) for line, _ in lines] == [level for _, level in lines]
    assert level_of.message("[rank 1] ERROR cptflow.tasks.sft: no example") == "[rank 1] cptflow.tasks.sft: no example"
    assert level_of.message("WARNING x: y") == "x: y" and level_of.message("  File ...") == "  File ..."


def test_deterministic_errors_are_not_retried_and_crashes_are():
    """Bad data, config or template: a retry meets it again. A killed or crashed process: a retry resumes."""
    from prefect.states import Failed

    from cptflow.flows.pipeline import retry_unless_deterministic
    from cptflow.tasks.sft import SftDataError
    from cptflow.training_process import TrainingStageError, is_deterministic

    class TemplateError(Exception):  # jinja2's, matched by name
        pass

    assert is_deterministic(SftDataError("no usable training example")) and is_deterministic(TemplateError("x"))
    assert is_deterministic(TrainingStageError("sft: ...", error_type="SftDataError", deterministic=True))
    assert not is_deterministic(TrainingStageError("cpt: ...", error_type="OutOfMemoryError", deterministic=False))
    assert not is_deterministic(TrainingProcessError("torchrun exited with code -9")) and not is_deterministic(
        RuntimeError("CUDA error")
    )
    assert retry_unless_deterministic(None, None, Failed(data=TrainingProcessError("killed"))) is True
    assert retry_unless_deterministic(None, None, Failed(data=SftDataError("bad"))) is False

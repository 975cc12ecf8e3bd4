"""The parent side of a training stage: start its process tree (torchrun or `accelerate launch` running
`python -m cptflow.launch --spec FILE`, one process per GPU), stream its output line by line into the
run log, and kill all of it when it must stop.

The parent (the flow's training task) owns the tree. A timeout, a cancelled flow run (Prefect's
runner sends the flow process SIGTERM), Ctrl-C or any error in the parent kills all of it: the
child's process group and every descendant (torchrun's workers live in sessions of their own),
SIGTERM first, then SIGKILL for what ignores it (a worker hung in a collective). If the parent is
SIGKILLed itself, the kernel sends the launcher SIGTERM (PR_SET_PDEATHSIG) and torchrun stops its
workers.

Progress (start, log, eval, checkpoint) travels on the same stream as lines with a marker, so the
parent's reporter (the Prefect artifacts) sees it as if training ran in the flow's own process.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil

from cptflow.store import WORK, atomic_write_json, read_json, read_manifest

EVENT_MARKER = "@@cptflow-event@@ "
KILL_GRACE_SECONDS = 10.0


class TrainingProcessError(RuntimeError):
    """The training process tree exited with an error (its last output lines are in the message)."""


class TrainingTimeout(TrainingProcessError):
    pass


class TrainingStageError(TrainingProcessError):
    """The stage's own exception, raised inside the training process and carried out of torchrun: its
    message leads; `deterministic` says whether a retry would meet it again (bad data, config, template)."""

    def __init__(self, message: str, *, error_type: str, deterministic: bool):
        super().__init__(message)
        self.error_type = error_type
        self.deterministic = deterministic


# Errors a retry meets again: the data, the config or a chat template is wrong, not the machine.
# (jinja2's TemplateError is matched by name: jinja2 comes with transformers, not with this module.)
DETERMINISTIC_ERRORS = (ValueError, TypeError, LookupError, NotImplementedError, FileNotFoundError)
DETERMINISTIC_ERROR_NAMES = {"TemplateError", "TemplateSyntaxError", "UndefinedError", "TemplateNotFound"}
ERROR_FILE_PREFIX = "error-rank"


def is_deterministic(error: BaseException) -> bool:
    """Whether retrying would meet `error` again (a TrainingStageError knows; a crash or kill does not)."""
    if isinstance(error, TrainingStageError):
        return error.deterministic
    if isinstance(error, TrainingProcessError):
        return False  # killed, out of memory, a timeout: worth the retry that resumes from a checkpoint
    names = {cls.__name__ for cls in type(error).__mro__}
    return isinstance(error, DETERMINISTIC_ERRORS) or bool(names & DETERMINISTIC_ERROR_NAMES)


def write_error(directory: Path, rank: int, error: BaseException) -> None:
    """In the child: the exception that ends this rank, for the parent to lead its message with."""
    record = {
        "type": type(error).__name__,
        "message": str(error),
        "deterministic": is_deterministic(error),
        "rank": rank,
    }
    atomic_write_json(Path(directory) / WORK / f"{ERROR_FILE_PREFIX}{rank}.json", record)


def read_errors(directory: Path) -> list[dict]:
    """The child's error records, lowest rank first."""
    paths = sorted((Path(directory) / WORK).glob(f"{ERROR_FILE_PREFIX}*.json"))
    return sorted((read_json(path) for path in paths), key=lambda record: record["rank"])


def clear_errors(directory: Path) -> None:
    for path in (Path(directory) / WORK).glob(f"{ERROR_FILE_PREFIX}*.json"):
        path.unlink(missing_ok=True)


class TrainingCancelled(BaseException):  # like KeyboardInterrupt: not swallowed by `except Exception`
    pass


def write_spec(stage: str, run, cfg) -> Path:
    """What the child needs to run the stage. The notify section (a webhook secret) stays behind."""
    spec = {
        "stage": stage,
        "run": {
            "stage": run.stage,
            "fingerprint": run.fingerprint,
            "directory": run.directory,
            "upstream_directory": run.upstream_directory,
            "payload": run.payload,
            "stage_directories": run.stage_directories,
        },
        "config": cfg.model_dump(mode="json", exclude={"notify"}),
        "base_dir": cfg.base_dir,
    }
    path = run.path / WORK / "launch.json"
    atomic_write_json(path, spec)
    return path


def launch_command(cfg, spec: Path, processes: int) -> list[str]:
    """The launcher's command line; both are run as modules of this interpreter (no PATH lookup)."""
    launch = cfg.launch
    child = ["-m", "cptflow.launch", "--spec", str(spec)]
    if launch.launcher == "torchrun":
        # --standalone: a private rendezvous on a free port, so two runs on one machine never collide.
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "--max-restarts=0",
            *child,
        ]
    if launch.launcher == "accelerate":
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            f"--num_processes={processes}",
            "--num_machines=1",
        ]
        if launch.accelerate_config:
            command += ["--config_file", str(cfg.resolve(launch.accelerate_config))]
        if processes > 1:
            command.append("--multi_gpu")
        return [*command, *child]
    raise ValueError(f"launch.launcher {launch.launcher!r} does not start a process")


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM interrupts the wait with an exception, so the `finally` that kills the tree runs.

    Inside a Prefect flow run the engine has installed its own handler (it raises TerminationSignal);
    that one is kept. Signal handlers can only be set from the main thread.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def cancel(signum, frame):
        raise TrainingCancelled(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, cancel)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _descendants(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_process_tree(process: subprocess.Popen, grace_seconds: float = KILL_GRACE_SECONDS) -> None:
    """SIGTERM to the child's process group and to every descendant, SIGKILL to what is left after
    `grace_seconds`. Descendants are looked up, not just signalled through the group: torchrun starts
    each worker in a session of its own, where a group signal does not reach."""

    def signal_all(sig: int, members: list) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)  # start_new_session: the child leads its own group
        for member in members:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                member.send_signal(sig)

    tree = _descendants(process.pid)  # before the launcher dies and its workers are re-parented
    signal_all(signal.SIGTERM, tree)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and (process.poll() is None or any(_running(m) for m in tree)):
        time.sleep(0.1)
    leftovers = [m for m in tree if _running(m)]
    leftovers += [d for m in leftovers for d in _descendants(m.pid)]
    signal_all(signal.SIGKILL, leftovers)
    psutil.wait_procs(leftovers, timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def _running(member) -> bool:
    try:
        return member.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def run_process_tree(
    command: list[str],
    *,
    on_line: Callable[[str], None],
    timeout_seconds: float | None = None,
    env: dict | None = None,
    cwd: str | Path | None = None,
    on_start: Callable[[int], None] | None = None,
) -> None:
    """Run `command` in its own process group, passing each output line (stdout and stderr) to `on_line`.

    Raises TrainingTimeout after `timeout_seconds`, TrainingProcessError on a non-zero exit. However it
    ends (success, error, timeout, SIGTERM, Ctrl-C), no process of the group is left running.
    """
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,  # universal newlines: progress bars' carriage returns become line ends
        encoding="utf-8",
        errors="replace",
        bufsize=1,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    if on_start:
        on_start(process.pid)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + timeout_seconds if timeout_seconds else None
    tail: collections.deque[str] = collections.deque(maxlen=30)
    try:
        with _sigterm_raises():
            while True:
                if deadline is not None and time.monotonic() > deadline:
                    raise TrainingTimeout(
                        f"{command_name(command)} ran past its timeout of {timeout_seconds:.0f} s; "
                        "its process tree was killed"
                    )
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    continue
                if line is None:
                    break
                tail.append(line)
                on_line(line)
            code = process.wait()
    finally:
        kill_process_tree(process)  # also after a clean exit: nothing the workers spawned outlives them
    if code != 0:
        shown = "\n".join(line for line in tail if EVENT_MARKER not in line)
        raise TrainingProcessError(f"{command_name(command)} exited with code {code}; its last output:\n{shown}")


def command_name(command: list[str]) -> str:
    return (
        "torchrun"
        if "torch.distributed.run" in command
        else "accelerate launch"
        if "accelerate.commands.launch" in command
        else command[0]
    )


LEVEL_PREFIX = re.compile(r"^(?:\[rank \d+\] )?(DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
PYTHON_WARNING = re.compile(r"\b[A-Z]\w*Warning: ")


class LineLevels:
    """The logging level of each line the training process prints, so that a WARNING stays a WARNING in
    the run log (the UI filters by level). The child logs as `LEVEL name: message` (cptflow/launch.py);
    an unprefixed line continues the line before it (a multi-line message, a traceback), except a
    traceback's first line (ERROR) and a Python warning (WARNING)."""

    def __init__(self) -> None:
        self.current = logging.INFO

    def __call__(self, line: str) -> int:
        match = LEVEL_PREFIX.match(line)
        if match:
            self.current = logging.getLevelName(match.group(1))
        elif line.startswith("Traceback (most recent call last)"):
            self.current = logging.ERROR
        elif PYTHON_WARNING.search(line):
            return logging.WARNING
        return self.current

    @staticmethod
    def message(line: str) -> str:
        """The line without its level word (the run log shows the level): `[rank 1] name: message`."""
        match = LEVEL_PREFIX.match(line)
        return line[: match.start(1)] + line[match.end(1) + 1 :] if match else line


def launch_stage(stage: str, run, cfg, reporter, log: Callable[[int, str], None]) -> dict:
    """Run a training stage through the configured launcher; returns its committed manifest.

    `log(level, line)` receives every output line at the level it was logged with (Logger.log will do).
    """
    processes = 1 if stage == "evaluate" else cfg.launch.num_processes
    spec = write_spec(stage, run, cfg)
    command = launch_command(cfg, spec, processes)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", TQDM_DISABLE="1")  # progress comes as events

    level_of = LineLevels()

    def on_line(line: str) -> None:
        before, marker, payload = line.partition(EVENT_MARKER)  # another writer may have left half a line before it
        if before.strip():
            log(level_of(before), level_of.message(before))
        if not marker:
            return
        try:
            event = json.loads(payload)
        except json.JSONDecodeError:
            log(logging.INFO, line)
            return
        deliver_event(reporter, event)

    timeout = cfg.launch.timeout_minutes * 60 if cfg.launch.timeout_minutes else None
    log(logging.INFO, f"{stage}: {command_name(command)} with {processes} process(es): {' '.join(command)}")
    clear_errors(run.path)
    try:
        run_process_tree(command, on_line=on_line, timeout_seconds=timeout, env=env, cwd=cfg.base_dir)
    except TrainingTimeout:
        raise
    except TrainingProcessError as error:
        errors = read_errors(run.path)
        if not errors:
            raise  # killed or crashed before it could say why: the output tail is the best there is
        first = errors[0]
        where = f" (rank {first['rank']})" if processes > 1 else ""
        raise TrainingStageError(
            f"{stage}: {first['type']}: {first['message'].removeprefix(f'{stage}: ')}{where}\n"
            f"({command_name(command)} exited with an error; the whole output is in the run log)",
            error_type=first["type"],
            deterministic=first["deterministic"],
        ) from error
    manifest = read_manifest(run.path)
    if manifest is None:
        raise TrainingProcessError(
            f"{stage}: the training process exited cleanly but committed no manifest in {run.path}"
        )
    return manifest


def deliver_event(reporter, event: dict) -> None:
    name, args = event["event"], event["args"]
    if name == "on_checkpoint":
        args = [Path(args[0]), Path(args[1]) if args[1] else None]
    getattr(reporter, name)(*args)

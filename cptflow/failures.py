"""Why a run failed, in one line a user can act on: disk full, permission denied or a read-only file
system, out of memory, a worker killed by a signal, a training process's own error; the path involved
and the free space there. Also the free-space figures a stage is checked against before it writes.

Core layer: an exception and paths in, plain data out. The CLI prints it; flows/failure.py publishes it.
Anything it does not recognise keeps its own words: `Type: first line of the message`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from cptflow.gates import GateBreach
from cptflow.training_process import TrainingProcessError, TrainingStageError

MAX_SUMMARY_CHARS = 300  # one terminal line or two; the whole message is in the log file
MAX_CHAIN = 12  # causes and contexts looked at (an exception raised while handling another, and so on)

DISK_FULL_ERRNOS = {errno.ENOSPC: "ENOSPC", errno.EFBIG: "EFBIG", errno.EDQUOT: "EDQUOT"}
ACCESS_ERRNOS = {errno.EACCES: "EACCES", errno.EPERM: "EPERM"}

# Words libraries use for a full disk when they raise without an errno: numpy's tofile short write
# ("84224 requested and 70624 written"), safetensors' Rust IoError ("StorageFull"), torch's zip
# writer ("PytorchStreamWriter failed writing file"), pyarrow and the OS's own text.
DISK_FULL_WORDS = re.compile(
    r"\d+ requested and \d+ written|No space left on device|File too large|Disk quota exceeded|StorageFull"
    r"|\[Errno (?:28|27|122)\]|\bcode: (?:28|27|122)\b|PytorchStreamWriter failed writing file"
)
READ_ONLY_WORDS = re.compile(r"Read-only file system|\[Errno 30\]|\bcode: 30\b")
ACCESS_WORDS = re.compile(r"Permission denied|Operation not permitted|\[Errno (?:13|1)\]|PermissionDenied")
MEMORY_WORDS = re.compile(r"out of memory|can't allocate memory|Cannot allocate memory|\[Errno 12\]", re.IGNORECASE)
MEMORY_TYPES = {"MemoryError", "OutOfMemoryError"}  # torch.cuda.OutOfMemoryError, torch.OutOfMemoryError
# A path in an OSError's text: "[Errno 28] No space left on device: '/work/clean/…'".
QUOTED_PATH = re.compile(r"\[Errno \d+\] [^:'\n]+: '([^'\n]+)'")
OS_ERROR_TEXT = re.compile(r"\[Errno (\d+)\] ([^:'\n]+)")
# torchrun's summary of a child that died: "exitcode  : -9 (pid: 123)"; a launcher killed itself:
# "torchrun exited with code -9".
CHILD_EXIT = re.compile(r"exitcode\s*:\s*-(\d+)|exited with code -(\d+)|Signal (\d+) \(SIG[A-Z0-9]+\) received")


class WorkerKilled(RuntimeError):
    """A worker process died without raising: killed by a signal (SIGKILL: often the out-of-memory
    killer) or crashed. `signal_number` is None where the runner could not say which signal."""

    def __init__(self, message: str, signal_number: int | None = None):
        super().__init__(message)
        self.signal_number = signal_number


@dataclass(frozen=True)
class FailureCause:
    kind: str  # disk_full, read_only, permission_denied, out_of_memory, worker_killed, stage_error, error
    summary: str  # one line, e.g. "disk full (ENOSPC: No space left on device)"
    path: str | None = None  # the file or directory involved, or the failed stage's directory
    free_bytes: int | None = None  # free space on the path's file system (disk full only)
    total_bytes: int | None = None
    hint: str | None = None  # what to change before the rerun


def human_bytes(count: int | float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def existing_ancestor(path: str | Path) -> Path:
    """The path itself or its nearest parent that exists (a stage directory not created yet)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_space(path: str | Path) -> tuple[int, int] | None:
    """(free bytes for this user, total bytes) of the file system holding `path`; None if unknown."""
    try:
        usage = shutil.disk_usage(existing_ancestor(path))
    except OSError:
        return None
    return usage.free, usage.total


def tree_bytes(path: str | Path) -> int:
    """Bytes of the regular files under `path` (0 if it does not exist); links are not followed."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed while we walked
                pass
    return total


def signal_text(number: int) -> str:
    """'signal 9 (SIGKILL: often the out-of-memory killer)'."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = "unknown"
    note = ": often the out-of-memory killer" if number == signal.SIGKILL else ""
    return f"signal {number} ({name}{note})"


def error_text(error: BaseException) -> str:
    """`Type: message`, also for an exception whose message is empty or whose __str__ raises."""
    try:
        message = str(error)
    except Exception:  # e.g. an exception built with arguments its __str__ does not expect
        message = repr(error.args)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _chain(error: BaseException) -> list[BaseException]:
    """The error, then what it was raised from or while handling, outermost first."""
    seen, chain, current = set(), [], error
    while current is not None and id(current) not in seen and len(chain) < MAX_CHAIN:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def first_line(text: str, limit: int = MAX_SUMMARY_CHARS) -> str:
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _errno_name(number: int | None) -> str:
    return errno.errorcode.get(number, str(number)) if number is not None else ""


def _os_error_cause(error: OSError) -> FailureCause | None:
    path = error.filename if isinstance(error.filename, str) else None
    reason = error.strerror or first_line(str(error))
    if error.errno in DISK_FULL_ERRNOS or (error.errno is None and DISK_FULL_WORDS.search(str(error))):
        name = DISK_FULL_ERRNOS.get(error.errno, "short write")
        return FailureCause("disk_full", f"disk full ({name}: {first_line(reason)})", path)
    if error.errno == errno.EROFS:
        return FailureCause("read_only", f"read-only file system (EROFS: {reason})", path)
    if error.errno in ACCESS_ERRNOS:
        return FailureCause("permission_denied", f"permission denied ({ACCESS_ERRNOS[error.errno]}: {reason})", path)
    if error.errno == errno.ENOMEM:
        return FailureCause("out_of_memory", f"out of memory (ENOMEM: {reason})", path)
    return None


def _text_cause(type_name: str, text: str) -> FailureCause | None:
    """A cause from an exception's type name and text: a training child's error travels as such, and
    libraries (safetensors, torch, numpy) raise a full disk without an errno."""
    quoted = QUOTED_PATH.search(text)
    path = quoted.group(1) if quoted else None
    line = first_line(text)
    os_error = OS_ERROR_TEXT.match(line)
    if os_error:  # an OSError's own text: judged by its errno, as if raised here
        found = _os_error_cause(OSError(int(os_error.group(1)), os_error.group(2), path))
        if found:
            return found
    if type_name in MEMORY_TYPES or MEMORY_WORDS.search(text):
        return FailureCause("out_of_memory", f"out of memory ({type_name}: {line})", path)
    if DISK_FULL_WORDS.search(text):
        return FailureCause("disk_full", f"disk full ({type_name}: {line})", path)
    if READ_ONLY_WORDS.search(text):
        return FailureCause("read_only", f"read-only file system ({type_name}: {line})", path)
    if ACCESS_WORDS.search(text):
        return FailureCause("permission_denied", f"permission denied ({type_name}: {line})", path)
    return None


def _specific_cause(error: BaseException) -> FailureCause | None:
    names = {cls.__name__ for cls in type(error).__mro__}
    if isinstance(error, WorkerKilled):
        return FailureCause("worker_killed", first_line(str(error)))
    if isinstance(error, GateBreach):
        return FailureCause("gate_breach", first_line(str(error)), error.directory, hint=GateBreach.hint)
    if isinstance(error, TrainingStageError) and error.error_type == "GateBreach":  # cpt/sft, out of torchrun
        return FailureCause(
            "gate_breach", first_line(re.sub(r"^\w+: GateBreach: ", "", str(error))), hint=GateBreach.hint
        )
    if isinstance(error, OSError):
        return _os_error_cause(error) or (
            _text_cause(type(error).__name__, str(error)) if error.errno is None else None
        )
    if isinstance(error, MemoryError) or names & MEMORY_TYPES:
        return FailureCause("out_of_memory", f"out of memory ({type(error).__name__}: {first_line(str(error))})")
    if "BrokenProcessPool" in names or "BrokenExecutor" in names:
        return FailureCause(
            "worker_killed",
            f"a worker process died ({type(error).__name__}; a SIGKILL is often the out-of-memory killer)",
        )
    if "KilledWorker" in names:  # distributed: the scheduler gave up on a task whose workers kept dying
        return FailureCause(
            "worker_killed",
            f"Dask workers died running it (KilledWorker: often the out-of-memory killer; see the worker logs): "
            f"{first_line(str(error), 160)}",
        )
    if isinstance(error, TrainingStageError):  # the child's own exception, carried out of torchrun
        text = re.sub(rf"^\w+: {re.escape(error.error_type)}: ", "", str(error))  # "cpt: OSError: …"
        child = _text_cause(error.error_type, text)
        return child or FailureCause("stage_error", first_line(str(error)))
    if isinstance(error, TrainingProcessError):  # died without saying why: a signal, or a crash
        killed = CHILD_EXIT.search(str(error))
        if killed:
            number = int(next(group for group in killed.groups() if group))
            return FailureCause("worker_killed", f"the training process was killed by {signal_text(number)}")
        return _text_cause(type(error).__name__, str(error))
    if isinstance(error, RuntimeError):  # torch's CPU allocator, a writer that lost its errno
        return _text_cause(type(error).__name__, str(error))
    return None


HINTS = {
    "disk_full": "free space there (or point --work-dir at a larger disk), then resume",
    "read_only": "make the work directory writable (or point --work-dir elsewhere), then resume",
    "permission_denied": "give this user write access to the path (or point --work-dir elsewhere), then resume",
    "out_of_memory": "lower the batch size or the workers (runner.max_workers), or use a larger machine, then resume",
    "worker_killed": "if it was the out-of-memory killer, lower runner.max_workers or the batch size, then resume",
}


def classify_failure(error: BaseException, fallback_path: str | Path | None = None) -> FailureCause:
    """The cause of `error` in one line, the path involved and, for a full disk, the free space there.

    The first exception of the chain (it, what it was raised from, what it was raised while handling)
    that is a known kind decides; none known: `Type: message` of `error` itself.
    """
    cause = next((found for found in map(_safe_cause, _chain(error)) if found is not None), None)
    if cause is None:
        return FailureCause("error", first_line(error_text(error)), _path(fallback_path))
    path = cause.path or _path(fallback_path)
    free = total = None
    if cause.kind == "disk_full" and path:
        space = disk_space(path)
        free, total = space if space else (None, None)
    return FailureCause(cause.kind, cause.summary, path, free, total, cause.hint or HINTS.get(cause.kind))


def _safe_cause(error: BaseException) -> FailureCause | None:
    try:
        return _specific_cause(error)
    except Exception:  # an exception that cannot even be read: the fallback names its type
        return None


def _path(path: str | Path | None) -> str | None:
    return str(path) if path is not None else None


def model_weight_bytes(name: str) -> int | None:
    """Bytes of the weight files of a local model directory; None for a hub id or a builtin model."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    suffixes = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes)) or None


def low_space_message(stage: str, directory: str | Path, needed: int, basis: str) -> str | None:
    """A warning when the file system of `directory` has less free space than `needed` bytes; None otherwise."""
    space = disk_space(directory)
    if space is None or space[0] >= needed:
        return None
    free, total = space
    return (
        f"{stage}: only {human_bytes(free)} free (of {human_bytes(total)}) on the file system of {directory}, "
        f"below the ~{human_bytes(needed)} this stage may write ({basis}); it may fail with a full disk"
    )

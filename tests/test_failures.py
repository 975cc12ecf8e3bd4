"""A failed `cptflow run` says what failed, where, and how to resume, in a few lines; the tracebacks go to a
log file. Real failures on the demo config: a full disk (a small tmpfs, or RLIMIT_FSIZE), a read-only work
directory (a read-only tmpfs), a data-stage worker process SIGKILLed; then the rerun that resumes.

Mounting needs root with CAP_SYS_ADMIN (a container run as root has it); without, the tmpfs cases skip and
the RLIMIT_FSIZE case still runs.
"""

from __future__ import annotations

import errno
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml
from typer.testing import CliRunner

from cptflow.cli import app
from cptflow.config import load_config
from cptflow.failures import WorkerKilled, classify_failure, signal_text
from cptflow.plan import plan_pipeline, run_data_stage_plain
from cptflow.store import read_manifest
from cptflow.training_process import TrainingProcessError, TrainingStageError

REPO = Path(__file__).resolve().parents[1]
MAX_OUTPUT_LINES = 25  # the whole terminal output of a failed run


def _try_mount() -> bool:
    target = Path(tempfile.mkdtemp(prefix="cptflow-mount-probe-"))
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)], capture_output=True)
        if done.returncode != 0:
            return False
        subprocess.run(["umount", str(target)], check=True)
        return True
    except OSError:  # no mount binary
        return False
    finally:
        target.rmdir()


CAN_MOUNT = _try_mount()
needs_mount = pytest.mark.skipif(not CAN_MOUNT, reason="mounting a tmpfs needs root with CAP_SYS_ADMIN")


class Tmpfs:
    """A size-limited tmpfs at `path`, unmounted at the end of the test."""

    def __init__(self, path: Path, size: str, read_only: bool = False):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def tmpfs(tmp_path):
    mounts = []

    def make(name: str, size: str, read_only: bool = False) -> Tmpfs:
        mounts.append(Tmpfs(tmp_path / name, size, read_only))
        return mounts[-1]

    yield make
    for mount in reversed(mounts):
        mount.close()


def demo_config(directory: Path, **overrides) -> Path:
    """configs/demo.yaml with absolute input paths (it can live anywhere) and `overrides` on top."""
    config = {**yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()), **overrides}
    base = REPO / "configs"
    for source in config["sources"]:
        source["paths"] = [os.path.normpath(base / path) for path in source["paths"]]  # globs too
    for item in config["sft"]["data"]:
        item["path"] = os.path.normpath(base / item["path"])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def cli_env(prefect_harness):
    """The environment of a `cptflow` subprocess: the session's Prefect server, no temporary one."""
    from prefect.settings import PREFECT_API_URL

    return dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONDONTWRITEBYTECODE="1")


def cptflow(args: list[str], env: dict, cwd: Path, **popen) -> subprocess.CompletedProcess:
    """`cptflow ARGS` as a user runs it (a fresh interpreter; its stdout and stderr together)."""
    return subprocess.run(
        [sys.executable, "-m", "cptflow.cli", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        **popen,
    )


def block_fields(output: str) -> dict[str, str]:
    """The failure block's `name: value` lines (cause, path, fix, resume, log)."""
    fields = {}
    for line in output.splitlines():
        name, colon, value = line.strip().partition(":")
        if colon and name in ("cause", "path", "fix", "resume", "log"):
            fields[name] = value.strip()
    return fields


def assert_short_failure(result: subprocess.CompletedProcess, stage: str) -> dict[str, str]:
    output = result.stdout
    assert result.returncode == 1, output
    lines = output.splitlines()
    assert len(lines) < MAX_OUTPUT_LINES, f"{len(lines)} lines:\n{output}"
    assert "Traceback (most recent call last)" not in output, output
    assert f"error: cptflow run failed in stage '{stage}'" in output, output
    fields = block_fields(output)
    assert {"cause", "path", "resume", "log"} <= set(fields), output
    log = Path(fields["log"].split(" (the full traceback")[0])
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "cptflow run failed:" in text
    fields["log_text"] = text
    return fields


def resume(fields: dict[str, str]):
    """Run the printed resume command word for word (in this process: no interpreter start-up)."""
    argv = shlex.split(fields["resume"])
    assert argv[:2] == ["cptflow", "run"], argv
    return CliRunner().invoke(app, argv[1:])


def outputs(directory: str | Path) -> dict[str, str]:
    return {entry["path"]: entry["sha256"] for entry in read_manifest(Path(directory))["outputs"]}


def reference_clean(config: Path, work: Path) -> dict[str, str]:
    """clean's outputs from an uninterrupted run on a roomy disk (plain, without Prefect: same bytes)."""
    cfg = load_config(config, work)
    run = plan_pipeline(cfg)["clean"]
    run_data_stage_plain(run, cfg)
    return outputs(run.directory)


def _limit_file_size(limit: int):
    def preexec() -> None:
        # Writes past the limit fail with EFBIG instead of the process dying of SIGXFSZ.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


# The tmpfs case runs in `make test`; the RLIMIT_FSIZE one (processes runner) in `make test-slow`.
@pytest.mark.parametrize("limit", ["tmpfs", pytest.param("rlimit_fsize", marks=pytest.mark.slow)])
def test_disk_full_names_stage_cause_free_space_and_the_resume_that_finishes(limit, cli_env, tmpfs, tmp_path):
    if limit == "tmpfs":
        if not CAN_MOUNT:
            pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
        config = demo_config(tmp_path / "config")
        disk = tmpfs("small-disk", "512k")
        work, popen = disk.path / "work", {}
    else:
        # Any file past 256 KiB (a clean shard of the domain abstracts) fails with EFBIG, in the shards'
        # worker processes (the limit is inherited): their Prefect tracebacks must stay off the terminal too.
        config = demo_config(tmp_path / "config", runner={"kind": "processes", "max_workers": 1})
        disk, work, popen = None, tmp_path / "work", {"preexec_fn": _limit_file_size(256 << 10)}

    failed = cptflow(["run", str(config), "--only", "clean", "--work-dir", str(work)], cli_env, tmp_path, **popen)

    fields = assert_short_failure(failed, "clean")
    stage_dir = plan_pipeline(load_config(config, work))["clean"].path
    assert fields["path"].startswith(str(stage_dir)), fields
    assert fields["resume"] == shlex.join(["cptflow", "run", str(config), "--only", "clean", "--work-dir", str(work)])
    assert "--from clean" in failed.stdout  # the other choice: recompute the stage from scratch
    if limit == "tmpfs":
        assert fields["cause"] == "disk full (ENOSPC: No space left on device)", fields
        assert " free of 512.0 KiB there now)" in fields["path"], fields
        # Warned before it started: the inputs alone are larger than the disk.
        assert "clean: only " in failed.stdout and "it may fail with a full disk" in failed.stdout
        assert "No space left on device" in fields["log_text"]
    else:
        assert fields["cause"] == "disk full (EFBIG: File too large)", fields
    finished = list((stage_dir / "_work").glob("*.done.json"))
    assert finished, "no shard finished before the disk filled: nothing to resume"

    if limit == "rlimit_fsize" and CAN_MOUNT:
        return  # the tmpfs case resumes; this one is here for the EFBIG path and the workers' terminal
    if disk is not None:
        disk.remount("size=64m")
    resumed = resume(fields)
    assert resumed.exit_code == 0, resumed.output[-3000:]
    if limit == "tmpfs":  # byte-identical to an uninterrupted run
        assert outputs(stage_dir) == reference_clean(config, tmp_path / "reference")


@needs_mount
def test_read_only_work_dir_says_so_and_the_rerun_resumes_once_writable(cli_env, tmpfs, tmp_path):
    config = demo_config(tmp_path / "config")
    disk = tmpfs("read-only", "64m", read_only=True)
    work = disk.path

    failed = cptflow(["run", str(config), "--only", "clean", "--work-dir", str(work)], cli_env, tmp_path)

    fields = assert_short_failure(failed, "clean")
    assert fields["cause"].startswith("read-only file system (EROFS: Read-only file system)"), fields
    assert fields["path"].startswith(str(work / "clean")), fields
    assert "make the work directory writable" in fields["fix"]
    # The work directory cannot hold the log: it is in the temporary directory instead.
    assert fields["log"].startswith(str(Path(tempfile.gettempdir()) / "cptflow-logs")), fields
    assert "Read-only file system" in fields["log_text"]
    debug = CliRunner().invoke(app, ["run", str(config), "--only", "clean", "--work-dir", str(work), "--debug"])
    assert debug.exit_code == 1 and "Traceback (most recent call last)" in debug.output  # --debug: here too
    assert "read-only file system (EROFS" in debug.output

    disk.remount("rw")
    resumed = resume(fields)
    assert resumed.exit_code == 0, resumed.output[-3000:]
    assert plan_pipeline(load_config(config, work))["clean"].is_done()


def _pool_workers(process: psutil.Process) -> list[psutil.Process]:
    workers = []
    for child in process.children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.NoSuchProcess:
            pass
    return workers


@pytest.mark.slow  # a process-pool run killed and resumed (tens of seconds): `make test-slow`
def test_a_worker_killed_by_sigkill_is_named_with_its_signal_and_the_rerun_resumes(cli_env, tmp_path):
    """A data stage on `runner: processes`; its one worker process is SIGKILLed (as the OOM killer does)
    once it has finished a shard."""
    sources = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["sources"]
    config = demo_config(
        tmp_path / "config",
        runner={"kind": "processes", "max_workers": 1},
        sources=[dict(source, documents_per_shard=150) for source in sources],  # 20 shards
    )
    work = tmp_path / "work"
    stage_dir = plan_pipeline(load_config(config, work))["clean"].path
    command = [sys.executable, "-m", "cptflow.cli", "run", str(config), "--only", "clean", "--work-dir", str(work)]
    log_path = tmp_path / "killed-run.out"
    with open(log_path, "w") as out:
        child = subprocess.Popen(command, env=cli_env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True)
        parent, killed = psutil.Process(child.pid), None
        deadline = time.monotonic() + 300
        while child.poll() is None and time.monotonic() < deadline:
            workers = _pool_workers(parent)
            if workers and list((stage_dir / "_work").glob("*.done.json")):
                workers[0].send_signal(signal.SIGKILL)
                killed = workers[0].pid
                break
            time.sleep(0.05)
        child.wait(timeout=300)
    result = subprocess.CompletedProcess(command, child.returncode, log_path.read_text())
    assert killed, f"no worker was seen while shards were running:\n{result.stdout[-3000:]}"

    fields = assert_short_failure(result, "clean")
    assert (
        fields["cause"] == "a worker process of clean was killed by signal 9 (SIGKILL: often the out-of-memory killer)"
    )
    assert fields["path"] == str(stage_dir)
    assert "runner.max_workers" in fields["fix"]
    assert "BrokenProcessPool" in fields["log_text"]  # what the pool raised, under the WorkerKilled it became

    resumed = resume(fields)
    assert resumed.exit_code == 0, resumed.output[-3000:]
    assert read_manifest(stage_dir)["counts"]["in"] > 0


# ----------------------------------------------------------------------------------------------------
# The one-line causes, on exceptions as the libraries and the training launcher raise them
# ----------------------------------------------------------------------------------------------------
def test_each_cause_reads_as_one_line_with_its_path(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "shard.jsonl"))
    cause = classify_failure(full)
    assert (cause.kind, cause.summary, cause.path) == (
        "disk_full",
        "disk full (ENOSPC: No space left on device)",
        str(tmp_path / "shard.jsonl"),
    )
    assert cause.free_bytes is not None and cause.total_bytes >= cause.free_bytes  # measured where it failed

    short_write = OSError("84224 requested and 70624 written")  # numpy's tofile on a full disk: no errno
    assert (
        classify_failure(short_write, tmp_path).summary == "disk full (short write: 84224 requested and 70624 written)"
    )
    assert classify_failure(short_write, tmp_path).path == str(tmp_path)  # no filename: the stage directory

    assert classify_failure(PermissionError(errno.EACCES, "Permission denied", "/w/x")).summary == (
        "permission denied (EACCES: Permission denied)"
    )
    assert classify_failure(OSError(errno.EROFS, "Read-only file system", "/w")).kind == "read_only"
    try:
        bytearray(1 << 62)  # a real MemoryError
    except MemoryError as error:
        assert classify_failure(error).kind == "out_of_memory"

    wrapped = RuntimeError("writing shard 3 failed")  # a known cause under another exception is found
    wrapped.__cause__ = OSError(errno.EFBIG, "File too large", "/w/big")
    assert classify_failure(wrapped).summary == "disk full (EFBIG: File too large)"


def test_training_and_worker_failures_say_what_killed_them():
    child = TrainingStageError(
        "cpt: OSError: [Errno 28] No space left on device: '/w/cpt/abc/checkpoints/step-50/adapter.safetensors'\n"
        "(torchrun exited with an error; the whole output is in the run log)",
        error_type="OSError",
        deterministic=False,
    )
    cause = classify_failure(child)
    assert cause.summary == "disk full (ENOSPC: No space left on device)"
    assert cause.path == "/w/cpt/abc/checkpoints/step-50/adapter.safetensors"
    rust = TrainingStageError(  # safetensors' writer, as measured on a full tmpfs
        "cpt: SafetensorError: Error while serializing: I/O error: No space left on device (os error 28)\n"
        "(torchrun exited with an error; the whole output is in the run log)",
        error_type="SafetensorError",
        deterministic=False,
    )
    assert classify_failure(rust, "/w/cpt/abc").summary == (
        "disk full (SafetensorError: Error while serializing: I/O error: No space left on device (os error 28))"
    )

    oom = TrainingStageError(
        "cpt: OutOfMemoryError: CUDA out of memory.", error_type="OutOfMemoryError", deterministic=False
    )
    assert classify_failure(oom).kind == "out_of_memory"

    torchrun_tail = TrainingProcessError(
        "torchrun exited with code 1; its last output:\n[ERROR] failed (exitcode: -9) local_rank: 0 (pid: 4242)\n"
        "  exitcode  : -9 (pid: 4242)"
    )
    assert classify_failure(torchrun_tail).summary == (
        "the training process was killed by signal 9 (SIGKILL: often the out-of-memory killer)"
    )
    assert signal_text(15) == "signal 15 (SIGTERM)"

    from concurrent.futures.process import BrokenProcessPool

    assert classify_failure(BrokenProcessPool("A process in the process pool was terminated abruptly")).kind == (
        "worker_killed"
    )
    assert classify_failure(WorkerKilled("a worker process of clean was killed by signal 9", 9)).kind == "worker_killed"
    pytest.importorskip("distributed")
    from distributed.scheduler import KilledWorker

    assert classify_failure(
        KilledWorker("clean-domain-00001", SimpleNamespace(address="tcp://127.0.0.1:1"), 3)
    ).summary.startswith("Dask workers died running it (KilledWorker")


def test_an_unknown_error_keeps_its_type_and_first_line():
    class GateBreach(ValueError):  # e.g. a failure kind the pipeline raises itself
        pass

    cause = classify_failure(GateBreach("evaluate: gate breached: general +12.0% (limit +10.0%)\nsecond line"))
    assert (cause.kind, cause.summary) == (
        "error",
        "GateBreach: evaluate: gate breached: general +12.0% (limit +10.0%)",
    )


def test_resume_command_keeps_finished_work_and_what_was_to_be_recomputed():
    from cptflow.flows.failure import resume_command

    assert resume_command("c.yaml", "quality") == "cptflow run c.yaml"
    assert (
        resume_command("c.yaml", "clean", only=["clean"], work_dir="/w")
        == "cptflow run c.yaml --only clean --work-dir /w"
    )
    # --from quality failed in perplexity: quality is done, perplexity resumes, what follows is still recomputed.
    assert resume_command("c.yaml", "perplexity", from_stage="quality", only=["quality", "perplexity", "mix"]) == (
        "cptflow run c.yaml --only quality --only perplexity --only mix --force mix"
    )
    assert resume_command("c.yaml", "sft", force=["clean", "evaluate"]) == "cptflow run c.yaml --force evaluate"


def test_low_space_warning_compares_free_space_with_the_estimate(tmp_path):
    from cptflow.failures import low_space_message

    assert low_space_message("clean", tmp_path, 1, "a byte") is None
    message = low_space_message("clean", tmp_path, 1 << 50, "an estimate")
    assert message.startswith("clean: only ") and f"on the file system of {tmp_path}" in message
    assert "below the ~1024.0 TiB this stage may write (an estimate); it may fail with a full disk" in message

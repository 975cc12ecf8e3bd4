"""Kill drills: SIGKILL every stage at seeded random moments, rerun it, compare with an uninterrupted run.

Not a stage of the DAG: `python drills/run.py kill` turns "nothing lost, deterministic and resumable" into
figures (survived/total per stage, docs/reliability.md). A trial survives when the killed stage left
either no manifest or a manifest whose every output verifies, its rerun finished, and the rerun's
outputs equal the reference's: data stages byte for byte (every file's sha256 and the manifest minus
timings), training stages tensor for tensor (adapter safetensors) and byte for byte.

    python drills/run.py kill --trials 20 --crash-points 10   # all 8 stages (~30 min on 2 cores)
    python drills/run.py kill --stages clean cpt --trials 3 --via prefect   # through `cptflow run`
    python drills/run.py kill --quick                 # 2 trials of quality and an 8-step cpt (the test's subset)

Random moments rarely land between writing a temporary and renaming it; `--crash-points` adds trials
where the child kills itself just before its k-th rename or unlink (every commit point and clean-up).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from drills import drill_command

REPO = Path(__file__).resolve().parents[1]
RAW = REPO / "data" / "raw"
STAGES = ("clean", "quality", "perplexity", "mix", "tokenize", "cpt", "sft", "evaluate")
TRAINING = ("cpt", "sft", "evaluate")
DEFAULT_ROOT = Path(os.environ.get("TMPDIR", "/tmp")) / "cptflow-drills"
# Manifest keys that legitimately differ between two runs of the same stage: wall-clock times, memory
# peaks, and where a training run resumed from. Everything else must be equal.
VOLATILE_KEYS = {
    "seconds",
    "timings",
    "finished",
    "seconds_this_run",
    "tokens_per_s_this_run",
    "memory",
    "resumed_from",
}


# ---------------------------------------------------------------------------------------------
# The drill pipeline: a slice of the sample corpus, the tiny test Llama, a few dozen training steps
# ---------------------------------------------------------------------------------------------


def _head_lines(path: Path, n: int) -> bytes:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        return b"".join(line for _, line in zip(range(n), handle))


def build_corpus(root: Path) -> Path:
    """Slices of data/raw, dirt included (HTML, duplicates, PII, malformed lines); same bytes every time."""
    corpus = root / "corpus"
    if (corpus / ".complete").is_file():
        return corpus
    shutil.rmtree(corpus, ignore_errors=True)
    (corpus / "domain").mkdir(parents=True)
    (corpus / "general").mkdir(parents=True)
    (corpus / "domain" / "abstracts.jsonl").write_bytes(_head_lines(RAW / "domain" / "abstracts.jsonl", 160))
    general = _head_lines(RAW / "general" / "web-000.jsonl.gz", 200)
    (corpus / "general" / "web-000.jsonl.gz").write_bytes(gzip.compress(general, mtime=0))
    (corpus / "general" / "web-002-dirty.jsonl").write_bytes((RAW / "general" / "web-002-dirty.jsonl").read_bytes())
    (corpus / ".complete").touch()
    return corpus


def build_model(root: Path, corpus: Path) -> Path:
    """The 2-layer test Llama (tests/conftest.py's spec), trained for a few seconds on the general slice.

    Built in a separate interpreter: the drill process itself runs no torch op, so that it can fork.
    """
    code = (
        "import sys; from pathlib import Path; from cptflow.tiny_model import TINY_TEST_SPEC, build_tiny_llama; "
        "print(build_tiny_llama([Path(sys.argv[1])], Path(sys.argv[2]), spec=TINY_TEST_SPEC))"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", code, str(corpus / "general" / "web-000.jsonl.gz"), str(root / "model-cache")],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(result.stdout.strip().splitlines()[-1])


def drill_config(corpus: Path, model: Path, name: str = "kill-drill", **overrides) -> dict:
    """Small shards so kills land between and inside them; training checkpoints every few steps so
    kills land before, between, during and after checkpoints."""
    config = {
        "name": name,
        "work_dir": "work",
        "base_model": str(model),
        "sources": [
            {"name": "domain", "role": "domain", "paths": [str(corpus / "domain")], "documents_per_shard": 40},
            {
                "name": "general",
                "role": "general",
                "paths": [str(corpus / "general")],
                "text_field": "content",
                "id_field": "doc_id",
                "documents_per_shard": 40,
            },
        ],
        "perplexity": {"keep_band": [0, 95], "batch_tokens": 4096, "max_length": 128},
        # Few held-out documents: 4-bit matmuls are slow on a CPU and every checkpoint evaluates.
        "mix": {"domain_eval_documents": 4, "general_eval_documents": 4, "window_documents": 50},
        "tokenize": {"seq_len": 64, "blocks_per_shard": 32},
        "cpt": {
            "lora": {"r": 4, "alpha": 8},
            "learning_rate": 1e-3,
            "embedding_learning_rate": 2.5e-4,
            "micro_batch_size": 4,
            "max_steps": 24,
            "eval_steps": 4,
            "save_steps": 4,
            "log_steps": 1,
            "torch_threads": 1,
        },
        "sft": {
            "data": [{"path": str(REPO / "data" / "instructions" / "alpaca.jsonl")}],
            "max_length": 96,
            "micro_batch_size": 4,
            "max_steps": 12,
            "eval_steps": 3,
            "save_steps": 3,
            "log_steps": 1,
            "torch_threads": 1,
        },
        "evaluate": {"prompts": ["What is a half-life?"], "max_new_tokens": 8},
    }
    config.update(overrides)
    return config


def write_config(directory: Path, config: dict) -> Path:
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------------------------------------
# Comparing a stage's result with the reference
# ---------------------------------------------------------------------------------------------


def stage_path(config: Path, work: Path, stage: str) -> Path:
    from cptflow.config import load_config
    from cptflow.plan import plan_pipeline

    return plan_pipeline(load_config(config, work))[stage].path


def stable(value):
    """A manifest without what differs between two equal runs (times, memory, resume point) or names
    the work directory (training stages record absolute paths of their inputs)."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def relative_paths(value, work: Path):
    text = json.dumps(value, sort_keys=True)
    return json.loads(text.replace(str(work), "<work>"))


def verify_committed(directory: Path) -> str:
    """'absent' (not committed), 'verified' (every output listed with the right sha256) or what is wrong."""
    from cptflow.store import read_manifest, sha256_file

    try:
        manifest = read_manifest(directory)
    except (ValueError, OSError) as error:  # a torn manifest would be a broken commit protocol
        return f"unreadable manifest: {error}"
    if manifest is None:
        return "absent"
    for entry in manifest.get("outputs", []):
        path = directory / entry["path"]
        if not path.is_file():
            return f"missing output {entry['path']}"
        if sha256_file(path) != entry["sha256"]:
            return f"output {entry['path']} does not match its sha256"
    return "verified"


def safetensors_tensors(path: Path) -> dict[str, tuple[str, list, bytes]]:
    """name -> (dtype, shape, raw bytes), read from the file format itself (8-byte header length,
    JSON header, data): equal bytes are equal tensors, and the drill process stays torch-free."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    body = data[8 + size :]
    return {
        name: (info["dtype"], info["shape"], body[info["data_offsets"][0] : info["data_offsets"][1]])
        for name, info in header.items()
        if name != "__metadata__"
    }


def max_abs_difference(a: tuple, b: tuple) -> float:
    import numpy as np

    def values(tensor):
        dtype, _, raw = tensor
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            return (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        return np.frombuffer(raw, dtype={"F32": np.float32, "F16": np.float16, "F64": np.float64}[dtype]).astype(
            np.float64
        )

    if a[0] != b[0] or a[1] != b[1] or a[0] not in ("BF16", "F32", "F16", "F64"):
        return float("inf")
    return float(np.max(np.abs(values(a).astype(np.float64) - values(b).astype(np.float64)), initial=0.0))


def adapter_tensors_equal(reference: Path, candidate: Path) -> tuple[bool, float]:
    """Every tensor of every adapter (final and checkpoints) equal; else the largest absolute difference."""
    files = sorted(p.relative_to(reference) for p in reference.rglob("*.safetensors"))
    worst, equal = 0.0, True
    for name in files:
        if not (candidate / name).is_file():
            return False, float("inf")
        a, b = safetensors_tensors(reference / name), safetensors_tensors(candidate / name)
        if a.keys() != b.keys():
            return False, float("inf")
        for key in a:
            if a[key] != b[key]:
                equal = False
                worst = max(worst, max_abs_difference(a[key], b[key]))
    return equal, worst


def compare_with_reference(
    reference_dir: Path, reference_work: Path, candidate_dir: Path, candidate_work: Path, stage: str
) -> list[str]:
    """What differs between a rerun and the reference (empty: identical)."""
    from cptflow.store import read_manifest

    problems = []
    ref, got = read_manifest(reference_dir), read_manifest(candidate_dir)
    if got is None:
        return ["no manifest after the rerun"]
    ref_outputs = {e["path"]: e["sha256"] for e in ref["outputs"]}
    got_outputs = {e["path"]: e["sha256"] for e in got["outputs"]}
    if ref_outputs != got_outputs:
        differing = sorted(
            p for p in ref_outputs.keys() | got_outputs.keys() if ref_outputs.get(p) != got_outputs.get(p)
        )
        problems.append(f"{len(differing)} output files differ: {differing[:4]}")
    ref_stable, got_stable = relative_paths(stable(ref), reference_work), relative_paths(stable(got), candidate_work)
    if ref_stable != got_stable:
        keys = sorted(k for k in ref_stable.keys() | got_stable.keys() if ref_stable.get(k) != got_stable.get(k))
        problems.append(f"manifest differs (minus timings) in {keys}")
    if stage in TRAINING:
        equal, worst = adapter_tensors_equal(reference_dir, candidate_dir)
        if not equal:
            problems.append(f"adapter tensors differ (max abs diff {worst:.3g})")
    return problems


def debris(directory: Path) -> list[str]:
    """Files a committed stage directory holds beyond its manifest's outputs (left by a killed writer)."""
    from cptflow.store import MANIFEST, read_manifest

    manifest = read_manifest(directory)
    if manifest is None:
        return []
    listed = {e["path"] for e in manifest["outputs"]} | {MANIFEST}
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and str(p.relative_to(directory)) not in listed
    )


# ---------------------------------------------------------------------------------------------
# Running a stage in a child process
# ---------------------------------------------------------------------------------------------


def preload(stages) -> None:
    """Import what the stages need once, in the drill process: forked children then start in
    milliseconds instead of the 10-20 s that importing torch, transformers and peft takes on 2 cores.
    Nothing here runs a torch op, so no thread pool exists yet when we fork."""
    import cptflow.flows  # noqa: F401  (Prefect defaults before prefect is imported)
    from cptflow.plan import stage_module

    for stage in stages:
        stage_module(stage)
    if any(stage in TRAINING for stage in stages):
        import peft  # noqa: F401

        import cptflow.export  # noqa: F401


def run_stage_here(config: str, work: str, stage: str) -> None:
    """Run one stage to completion in this process: the stage's own code, as the flow's tasks call it."""
    from cptflow.config import load_config
    from cptflow.plan import DATA_STAGES, plan_pipeline, run_data_stage_plain, stage_module

    cfg = load_config(config, work)
    run = plan_pipeline(cfg)[stage]
    if stage in DATA_STAGES:
        run_data_stage_plain(run, cfg)
    else:
        stage_module(stage).run(run, cfg)


def child_main(config: str, work: str, stage: str) -> None:
    """The child of a `--via prefect` trial: imports first, then READY on stdout, then `cptflow run`."""
    preload([stage])
    from cptflow.cli import app

    print("READY", flush=True)
    code = app(["run", config, "--work-dir", work, "--only", stage], standalone_mode=False)
    if code:  # a failed run: without standalone mode the command returns its exit code instead of exiting
        sys.exit(code)
    print("DONE", flush=True)


@dataclass
class ChildResult:
    returncode: int
    work_seconds: float  # from READY (or the fork) to exit, or to the kill
    peak_rss_mb: float
    killed: bool = False
    log: str = ""


def _wait(pid: int, started: float, deadline: float | None) -> tuple[int, object, bool]:
    """Wait for `pid`; SIGKILL it at `deadline` (monotonic) if it is still running."""
    killed = False
    while deadline is not None:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), usage, False
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))
    _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), usage, killed


def _result(returncode: int, usage, started: float, killed: bool, log_path: Path) -> ChildResult:
    tail = log_path.read_text(errors="replace")[-3000:] if returncode not in (0, -signal.SIGKILL) else ""
    # ru_maxrss is in KiB on Linux
    return ChildResult(returncode, round(time.monotonic() - started, 3), round(usage.ru_maxrss / 1024, 1), killed, tail)


# Crash points: the file-system calls that publish or remove something (every atomic rename, every
# file a cleanup deletes). Random moments rarely land in the milliseconds between writing a temporary
# and renaming it; a kill just before the k-th of these calls lands there by construction.
CRASH_CALLS = ("replace", "rename", "unlink", "rmdir")


def install_crash_point(crash_at: int | None):
    """In a forked child: SIGKILL this process just before its `crash_at`-th crash-point call.
    Returns a function that says how many calls were made (crash_at None: just count)."""
    calls = [0]

    def wrap(function):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)

        return wrapped

    for name in CRASH_CALLS:
        setattr(os, name, wrap(getattr(os, name)))
    return lambda: calls[0]


def _die_with_parent() -> None:
    """SIGKILL this child if the drill itself dies (Linux), so an interrupted drill leaves no stage running."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def fork_stage(
    config: Path,
    work: Path,
    stage: str,
    kill_after: float | None = None,
    crash_at: int | None = None,
    count_file: Path | None = None,
) -> ChildResult:
    """Run the stage in a forked child (imports already done); SIGKILL it `kill_after` seconds in, or
    let it kill itself at crash point `crash_at` (`count_file`: count its crash points instead)."""
    killing = kill_after is not None or crash_at is not None
    log_path = work.parent / f"{work.name}-{stage}-{'kill' if killing else 'run'}.log"
    work.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the drill
        code = 1
        try:
            _die_with_parent()
            log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            calls = install_crash_point(crash_at) if crash_at is not None or count_file is not None else None
            run_stage_here(str(config), str(work), stage)
            code = 0
            if count_file is not None:
                count_file.write_text(str(calls()))
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = started + kill_after if kill_after is not None else None
    returncode, usage, killed = _wait(pid, started, deadline)
    return _result(returncode, usage, started, killed, log_path)


def spawn_prefect_stage(
    config: Path, work: Path, stage: str, env: dict, kill_after: float | None = None
) -> ChildResult:
    """`cptflow run CONFIG --only STAGE` in a fresh interpreter; the clock starts when it is READY."""
    command = drill_command("kill", "--child", str(config), str(work), stage)
    log_path = work.parent / f"{work.name}-{stage}-{'kill' if kill_after is not None else 'run'}.log"
    work.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log)
        process.stdout.readline()  # READY (or EOF if the child died while importing)
        started = time.monotonic()
        deadline = started + kill_after if kill_after is not None else None
        returncode, usage, killed = _wait(process.pid, started, deadline)
        process.returncode = returncode  # reaped by _wait; keep Popen from waiting again
        process.stdout.close()
    return _result(returncode, usage, started, killed, log_path)


def run_child(
    config: Path,
    work: Path,
    stage: str,
    via: str,
    kill_after: float | None = None,
    env: dict | None = None,
    crash_at: int | None = None,
) -> ChildResult:
    if via == "prefect":
        return spawn_prefect_stage(config, work, stage, env or child_env(), kill_after)
    return fork_stage(config, work, stage, kill_after, crash_at=crash_at)


def child_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")


# ---------------------------------------------------------------------------------------------
# The drill
# ---------------------------------------------------------------------------------------------


@dataclass
class Trial:
    stage: str
    index: int
    kill_after_s: float
    killed: bool
    after_kill: str  # absent / verified / what was wrong
    rerun_returncode: int
    problems: list = field(default_factory=list)
    peak_rss_mb: float = 0.0
    seconds: float = 0.0
    debris: list = field(default_factory=list)
    progress_at_kill: str = ""

    @property
    def survived(self) -> bool:
        return self.after_kill in ("absent", "verified") and self.rerun_returncode == 0 and not self.problems


# --quick (the test's subset): 8 cpt steps, a checkpoint every 2, so that a test's kills still land
# between and inside checkpoints.
QUICK_CPT = {"max_steps": 8, "eval_steps": 2, "save_steps": 2}


def prepare_reference(root: Path, stages: list[str], quick: bool = False) -> tuple[Path, Path, dict]:
    """The drill config, and an uninterrupted run of every stage up to the last one drilled (each in a
    child, timed from READY): the reference outputs and the window kills are drawn from."""
    corpus = build_corpus(root)
    model = build_model(root, corpus)
    config = drill_config(corpus, model)
    if quick:
        config["cpt"] = {**config["cpt"], **QUICK_CPT}
    config = write_config(root, config)
    reference = root / "reference"
    timings_path = root / "reference-timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    last = max(STAGES.index(s) for s in stages)
    for stage in STAGES[: last + 1]:
        if stage in timings and (stage_path(config, reference, stage) / "manifest.json").is_file():
            continue
        result = run_child(config, reference, stage, "plain")
        if result.returncode != 0:
            raise RuntimeError(f"reference run of {stage} failed ({result.returncode}):\n{result.log}")
        timings[stage] = {"work_seconds": result.work_seconds, "peak_rss_mb": result.peak_rss_mb}
        print(f"reference {stage}: {result.work_seconds:.1f} s, peak RSS {result.peak_rss_mb:.0f} MB", flush=True)
        timings_path.write_text(json.dumps(timings, indent=2))
    return config, reference, timings


def seed_upstream(config: Path, reference: Path, work: Path, stage: str) -> None:
    """Copy the reference's committed stages before `stage` into a fresh work directory (the reference
    itself stays read-only: every trial gets its own copy)."""
    shutil.rmtree(work, ignore_errors=True)
    for upstream in STAGES[: STAGES.index(stage)]:
        source = stage_path(config, reference, upstream)
        shutil.copytree(source, work / upstream / source.name)


def progress_at_kill(directory: Path, stage: str) -> str:
    """How far the killed run got: committed, the latest complete checkpoint, or shards finished."""
    from cptflow.store import MANIFEST, WORK

    if (directory / MANIFEST).is_file():
        return "committed"
    if stage in ("cpt", "sft"):
        done = sorted(
            p.name for p in (directory / "checkpoints").glob("step-*") if (p / "trainer_state.json").is_file()
        )
        return done[-1] if done else "no checkpoint"
    if stage == "evaluate":
        return "started" if directory.exists() else "not started"
    return f"{len(list((directory / WORK).glob('*.done.json')))} shards done"


def calibrate(config: Path, reference: Path, stage: str, root: Path, via: str, env: dict) -> tuple[float, int]:
    """One more uninterrupted run, now, under the machine's current load: kills are drawn within the
    shorter of it and the reference (a moment after the stage's end kills nothing). Also returns how
    many crash points the run passed (plain runs; 0 through Prefect)."""
    work = root / "calibration" / via / stage
    seed_upstream(config, reference, work, stage)
    count_file = root / "calibration" / f"{stage}.crash-points"
    count_file.unlink(missing_ok=True)
    if via == "prefect":
        result = run_child(config, work, stage, via, env=env)
    else:
        result = fork_stage(config, work, stage, count_file=count_file)
    if result.returncode != 0:
        raise RuntimeError(f"calibration run of {stage} failed ({result.returncode}):\n{result.log}")
    shutil.rmtree(work, ignore_errors=True)
    return result.work_seconds, int(count_file.read_text()) if count_file.is_file() else 0


def run_trial(
    config: Path, reference: Path, stage: str, index: int, kill_after: float, trials_root: Path, via: str, env: dict
) -> Trial:
    """One kill and rerun. via "crash-point": `kill_after` is the crash point's number, not seconds."""
    started = time.monotonic()
    work = trials_root / stage / f"trial-{index:02d}"
    seed_upstream(config, reference, work, stage)
    directory = stage_path(config, work, stage)
    if via == "crash-point":
        killed = fork_stage(config, work, stage, crash_at=int(kill_after))
        killed.killed = killed.returncode == -signal.SIGKILL
        via = "plain"  # the rerun
    else:
        killed = run_child(config, work, stage, via, kill_after=kill_after, env=env)
    after_kill = verify_committed(directory)
    progress = progress_at_kill(directory, stage)
    if killed.returncode not in (0, -signal.SIGKILL):
        after_kill = f"child failed before the kill ({killed.returncode}): {killed.log[-300:]}"
    rerun = run_child(config, work, stage, via, env=env)
    problems = (
        []
        if rerun.returncode != 0
        else compare_with_reference(stage_path(config, reference, stage), reference, directory, work, stage)
    )
    if rerun.returncode != 0:
        problems.append(f"rerun failed ({rerun.returncode}): {rerun.log[-600:]}")
    trial = Trial(
        stage=stage,
        index=index,
        kill_after_s=round(kill_after, 3),
        killed=killed.killed,
        after_kill=after_kill,
        rerun_returncode=rerun.returncode,
        problems=problems,
        peak_rss_mb=max(killed.peak_rss_mb, rerun.peak_rss_mb),
        seconds=round(time.monotonic() - started, 1),
        debris=debris(directory),
        progress_at_kill=progress,
    )
    if trial.survived:
        shutil.rmtree(work, ignore_errors=True)  # keep failed trials for a post-mortem
    return trial


def kill_moments(seed: int, stage: str, trials: int, window: float) -> list[float]:
    """Seeded, uniform over the reference's working time (from READY to exit)."""
    rng = random.Random(f"{seed}-{stage}")
    return [rng.uniform(0.0, window) for _ in range(trials)]


def drill(
    stages: list[str],
    trials: int,
    seed: int,
    root: Path,
    via: str = "plain",
    prefect_trials: int = 0,
    crash_points: int = 0,
    quick: bool = False,
) -> dict:
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    # Forked and spawned children alike: offline, as `make` runs (a tokenizer saved online and one
    # saved offline differ in tokenizer_config.json's `local_files_only`).
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    preload(STAGES[: max(STAGES.index(s) for s in stages) + 1])
    config, reference, timings = prepare_reference(root, stages, quick)
    env = child_env()
    server = None
    if via == "prefect" or prefect_trials:
        server = start_prefect_server(root / "prefect")
        env = dict(env, **server.env)
    results: dict[str, dict] = {}
    try:
        for stage in stages:
            window, calls = calibrate(config, reference, stage, root, via, env)
            if via == "plain":  # the same path as the reference's
                window = min(window, timings[stage]["work_seconds"])
            plan = [(i, t, via) for i, t in enumerate(kill_moments(seed, stage, trials, window))]
            if prefect_trials and via != "prefect":
                prefect_window, _ = calibrate(config, reference, stage, root, "prefect", env)
                plan += [
                    (len(plan) + i, t, "prefect")
                    for i, t in enumerate(kill_moments(seed + 1, stage, prefect_trials, prefect_window))
                ]
            if crash_points and calls:
                points = sorted(
                    random.Random(f"{seed}-{stage}-crash").sample(range(1, calls + 1), min(crash_points, calls))
                )
                plan += [(len(plan) + i, point, "crash-point") for i, point in enumerate(points)]
            timings[stage]["kill_window_s"] = round(window, 2)
            timings[stage]["crash_points"] = calls
            stage_trials = []
            for index, kill_after, trial_via in plan:
                trial = run_trial(
                    config, reference, stage, index, kill_after, root / "trials" / trial_via, trial_via, env
                )
                stage_trials.append((trial_via, trial))
                mark = "ok" if trial.survived else "FAILED"
                at = f"crash point {int(kill_after)}" if trial_via == "crash-point" else f"{kill_after:6.2f}s"
                print(
                    f"{stage} #{index:02d} ({trial_via}) kill at {at} killed={trial.killed} "
                    f"after-kill={trial.after_kill} "
                    f"{mark} {'; '.join(trial.problems)} ({trial.seconds:.0f} s)",
                    flush=True,
                )
            results[stage] = summarise(stage, stage_trials, timings[stage])
    finally:
        if server is not None:
            server.stop()
    report = {
        "drill": "kill",
        "seed": seed,
        "trials_per_stage": trials,
        "via": via,
        "prefect_trials_per_stage": prefect_trials,
        "crash_point_trials_per_stage": crash_points,
        "stages": results,
        "seconds": round(time.monotonic() - started, 1),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    return report


def summarise(stage: str, stage_trials: list[tuple[str, Trial]], reference: dict) -> dict:
    def counts(via: str | None) -> dict:
        chosen = [t for v, t in stage_trials if via is None or v == via]
        return {"survived": sum(t.survived for t in chosen), "total": len(chosen)}

    trials = [t for _, t in stage_trials]
    return {
        **counts(None),
        "by_path": {via: counts(via) for via in sorted({v for v, _ in stage_trials})},
        "killed": sum(t.killed for t in trials),
        "committed_before_kill": sum(t.after_kill == "verified" for t in trials),
        "with_debris": sum(bool(t.debris) for t in trials),
        "reference_work_seconds": reference["work_seconds"],
        "kill_window_s": reference.get("kill_window_s"),
        "crash_points": reference.get("crash_points"),
        "progress_at_kill": dict(sorted(Counter(t.progress_at_kill for t in trials).items())),
        "peak_rss_mb": max([reference["peak_rss_mb"], *(t.peak_rss_mb for t in trials)]),
        "trial_seconds_mean": round(sum(t.seconds for t in trials) / max(1, len(trials)), 1),
        "trials": [dict(asdict(t), via=v, survived=t.survived) for v, t in stage_trials],
    }


def format_table(report: dict) -> str:
    lines = [
        (
            "| stage | survived/total | killed mid-run | committed before the kill | kill window (s) | crash points "
            "| peak RSS (MB) | s per trial |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage, r in report["stages"].items():
        paths = (
            ", ".join(f"{via} {c['survived']}/{c['total']}" for via, c in r["by_path"].items())
            if len(r["by_path"]) > 1
            else ""
        )
        lines.append(
            f"| {stage} | {r['survived']}/{r['total']}{f' ({paths})' if paths else ''} | {r['killed']} | "
            f"{r['committed_before_kill']} | "
            f"{r['kill_window_s']} | {r.get('crash_points') or ''} | {r['peak_rss_mb']:.0f} | "
            f"{r['trial_seconds_mean']:.0f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# A Prefect server shared by the children (one start instead of one temporary server per run)
# ---------------------------------------------------------------------------------------------


@dataclass
class PrefectServer:
    process: subprocess.Popen
    env: dict

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_prefect_server(home: Path, timeout: float = 180.0) -> PrefectServer:
    """`prefect server start` on a free port with its own PREFECT_HOME; returns once /api/health answers."""
    import urllib.request

    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    server_env = dict(os.environ, **env)
    server_env.pop("PREFECT_API_URL")
    prefect = Path(sys.executable).with_name("prefect")
    log = open(home / "server.log", "ab")
    process = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited ({process.returncode}); see {home / 'server.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                if response.status == 200:
                    return PrefectServer(process, env)
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"prefect server did not answer within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--trials", type=int, default=20, help="kill trials per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--via",
        choices=("plain", "prefect"),
        default="plain",
        help="plain: the stage's own run (what the flow's tasks call); prefect: `cptflow run --only STAGE`",
    )
    parser.add_argument("--prefect-trials", type=int, default=0, help="extra trials per stage through `cptflow run`")
    parser.add_argument(
        "--crash-points",
        type=int,
        default=0,
        help="extra trials per stage killed just before a seeded sample of its renames/unlinks",
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT / "kill", help="corpus, model, reference and trials")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--quick", action="store_true", help="2 trials of quality and of a shorter cpt (8 steps)")
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "WORK", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return 0
    if args.quick:
        args.stages, args.trials = ["quality", "cpt"], 2
    report = drill(
        args.stages,
        args.trials,
        args.seed,
        args.root,
        via=args.via,
        prefect_trials=args.prefect_trials,
        crash_points=args.crash_points,
        quick=args.quick,
    )
    table = format_table(report)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(report, table=table), indent=2) + "\n")
    failed = sum(r["total"] - r["survived"] for r in report["stages"].values())
    print(f"{failed} trial(s) failed; {report['seconds']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

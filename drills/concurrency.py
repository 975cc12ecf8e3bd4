"""Concurrency drills: two `cptflow run` at once, of the same config and of two configs sharing a work dir.

Not a stage of the DAG: `python drills/run.py concurrency` checks that a stage's work is done once (the
stage lock), that no stage directory is left half written, and that concurrent runs end with the
outputs of a run alone (docs/reliability.md). The witness of "done once" is the Prefect server, not the
runs' own reports: it counts the shard task runs of each data stage and the training tasks that trained.

    python drills/run.py concurrency                  # same config, two configs, builtin model cache (~10 min)
    python drills/run.py concurrency --only same-config --stages clean quality perplexity mix tokenize
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from drills.kill import (
    DEFAULT_ROOT,
    REPO,
    STAGES,
    build_corpus,
    build_model,
    child_env,
    compare_with_reference,
    debris,
    drill_config,
    stage_path,
    start_prefect_server,
    verify_committed,
    write_config,
)

SCENARIOS = ("same-config", "two-configs", "model-cache", "plain-pair")
CPTFLOW = Path(sys.executable).with_name("cptflow")


# ---------------------------------------------------------------------------------------------
# Running `cptflow run` and reading what it did
# ---------------------------------------------------------------------------------------------


def start_run(config: Path, env: dict, log: Path, stages: list[str], work: Path | None = None) -> subprocess.Popen:
    """`cptflow run CONFIG` (the CLI a user types), its table wide enough to parse."""
    command = [str(CPTFLOW), "run", str(config)]
    if list(stages) != list(STAGES):
        for stage in stages:
            command += ["--only", stage]
    if work is not None:
        command += ["--work-dir", str(work)]
    return subprocess.Popen(
        command, cwd=REPO, env=dict(env, COLUMNS="250"), stdout=open(log, "wb"), stderr=subprocess.STDOUT
    )


def finish(process: subprocess.Popen, log: Path, started: float) -> dict:
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    return {
        "returncode": process.returncode,
        "seconds": round(time.monotonic() - started, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "states": parse_states(text),
        "log": str(log),
        "tail": text[-1500:] if process.returncode else "",
    }


def parse_states(text: str) -> dict[str, str]:
    """stage -> ran / cached / done / not run, from the summary table `cptflow run` prints."""
    states = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")]
        cells = [c for c in cells if c]
        if len(cells) >= 2 and cells[0] in STAGES and cells[1] in ("ran", "cached", "done", "not run"):
            states[cells[0]] = cells[1]
    return states


def prefect_work_counts(env: dict, window: tuple[float, float], shard_names: dict[str, set]) -> Counter:
    """Per stage, the shard task runs (`<stage>-<shard>`, a shard the stage's manifest lists) that
    completed and started within `window` (epoch seconds): the data-stage work the runs of that window
    did. Read by start time, not by "new since the last look": the server ingests task runs from
    events with a delay. (A subflow's stand-in task run is named `<stage>-<n>`: not a shard.)"""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    work: Counter = Counter()
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        offset, runs = 0, []
        while batch := client.read_task_runs(limit=200, offset=offset):
            runs += batch
            offset += len(batch)
    for task_run in runs:
        stage, _, shard = task_run.name.partition("-")
        started = task_run.start_time.timestamp() if task_run.start_time else None
        if (
            shard in shard_names.get(stage, ())
            and task_run.state_name == "Completed"
            and started
            and window[0] <= started <= window[1]
        ):
            work[stage] += 1
    return work


def settle(
    env: dict, window: tuple[float, float], shard_names: dict[str, set], seconds: float = 5.0, patience: float = 60.0
) -> Counter:
    """The counts once they stop changing for `seconds` (the server has ingested the runs' events)."""
    deadline, last, stable_since = time.monotonic() + patience, None, time.monotonic()
    while True:
        counts = prefect_work_counts(env, window, shard_names)
        if counts != last:
            last, stable_since = counts, time.monotonic()
        elif time.monotonic() - stable_since >= seconds or time.monotonic() > deadline:
            return counts
        time.sleep(1.0)


def check_work_dir(config: Path, work: Path, stages: list[str]) -> list[str]:
    """Every stage directory of the store is committed, verifies, and holds nothing half written."""
    problems = []
    for stage in stages:
        root = work / stage
        for directory in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
            state = verify_committed(directory)
            if state != "verified":
                problems.append(f"{stage}/{directory.name}: {state}")
            leftovers = debris(directory)
            if leftovers:
                problems.append(f"{stage}/{directory.name}: files beyond the manifest {leftovers[:3]}")
    return problems


def compare_runs(config: Path, reference_work: Path, work: Path, stages: list[str]) -> dict[str, list[str]]:
    return {
        stage: compare_with_reference(
            stage_path(config, reference_work, stage), reference_work, stage_path(config, work, stage), work, stage
        )
        for stage in stages
    }


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------


def shard_names(config: Path, work: Path, stages: list[str]) -> dict[str, set]:
    """The shards each data stage maps to tasks (a single run's work), from its plan (read-only once
    the upstream stages in `work` are done)."""
    from cptflow.config import load_config
    from cptflow.plan import DATA_STAGES, plan_pipeline, stage_module

    cfg = load_config(config, work)
    runs = plan_pipeline(cfg)
    return {
        stage: {item["shard"] for item in stage_module(stage).plan(runs[stage], cfg)}
        for stage in stages
        if stage in DATA_STAGES
    }


def same_config(root: Path, config: Path, env: dict, stages: list[str]) -> dict:
    """A reference run alone, then two runs of the same config at once in a fresh work directory."""
    reference = root / "same-config" / "reference"
    shutil.rmtree(root / "same-config", ignore_errors=True)
    reference_window = [time.time()]
    alone = _run_alone(config, reference, env, root / "same-config" / "logs-reference", stages)
    reference_window.append(time.time())
    if alone["returncode"]:
        raise RuntimeError(f"reference run failed:\n{alone['tail']}")
    shared = root / "same-config" / "shared"
    window = [time.time()]
    both = _run_pair_in(config, config, shared, env, root / "same-config" / "logs", stages)
    window.append(time.time())
    names = shard_names(config, reference, stages)
    expected = {stage: len(shards) for stage, shards in names.items()}
    work = settle(env, tuple(window), names)
    # The witness checked on the run alone: it must count exactly one run's shards.
    witness_ok = settle(env, tuple(reference_window), names) == Counter(expected)
    ran = Counter(s for r in both for s, state in r["states"].items() if state == "ran")
    result = {
        "runs": both,
        "reference_run": alone,
        "succeeded": all(r["returncode"] == 0 for r in both),
        "ran_once": {s: ran[s] for s in stages},
        "shard_tasks_done": {s: work[s] for s in expected},
        "shard_tasks_expected": expected,
        "witness_counts_a_single_run": witness_ok,
        "store_problems": check_work_dir(config, shared, stages),
        "differences": {s: p for s, p in compare_runs(config, reference, shared, stages).items() if p},
    }
    result["passed"] = (
        result["succeeded"]
        and all(n == 1 for n in result["ran_once"].values())
        and result["shard_tasks_done"] == expected
        and not result["store_problems"]
        and not result["differences"]
        and witness_ok
    )
    return result


def _run_pair_in(config_a: Path, config_b: Path, work: Path, env: dict, logs: Path, stages: list[str]) -> list[dict]:
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    processes = []
    for index, config in enumerate((config_a, config_b)):
        log = logs / f"run-{index}.log"
        processes.append((start_run(config, env, log, stages, work=work), log))
    return [finish(process, log, started) for process, log in processes]


def two_configs(root: Path, config_a: Path, config_b: Path, env: dict, stages: list[str]) -> dict:
    """Two configs that share their clean stage run at once in one work directory; each must end with
    the outputs of its own run alone, and the shared stage must be done once."""
    base = root / "two-configs"
    shutil.rmtree(base, ignore_errors=True)
    references = {}
    for name, config in (("a", config_a), ("b", config_b)):
        references[name] = base / f"reference-{name}"
        alone = _run_alone(config, references[name], env, base / f"logs-reference-{name}", stages)
        if alone["returncode"]:
            raise RuntimeError(f"reference run of config {name} failed:\n{alone['tail']}")
    shared = base / "shared"
    window = [time.time()]
    both = _run_pair_in(config_a, config_b, shared, env, base / "logs", stages)
    window.append(time.time())
    names_a, names_b = shard_names(config_a, references["a"], stages), shard_names(config_b, references["b"], stages)
    work = settle(env, tuple(window), {s: names_a.get(s, set()) | names_b.get(s, set()) for s in stages})
    expected_a = {stage: len(shards) for stage, shards in names_a.items()}
    expected_b = {stage: len(shards) for stage, shards in names_b.items()}
    fingerprints = {s: (stage_path(config_a, shared, s).name, stage_path(config_b, shared, s).name) for s in stages}
    common = [s for s in stages if fingerprints[s][0] == fingerprints[s][1]]
    expected = Counter(expected_a)
    expected.update({s: n for s, n in expected_b.items() if s not in common})
    ran = Counter(s for r in both for s, state in r["states"].items() if state == "ran")
    expected_ran = {s: 1 if s in common else 2 for s in stages}
    result = {
        "runs": both,
        "succeeded": all(r["returncode"] == 0 for r in both),
        "shared_stages": common,
        "ran": {s: ran[s] for s in stages},
        "ran_expected": expected_ran,
        "shard_tasks_done": {s: work[s] for s in expected},
        "shard_tasks_expected": dict(expected),
        "store_problems": check_work_dir(config_a, shared, stages),
        "differences": {
            **{f"a/{s}": p for s, p in compare_runs(config_a, references["a"], shared, stages).items() if p},
            **{f"b/{s}": p for s, p in compare_runs(config_b, references["b"], shared, stages).items() if p},
        },
    }
    result["passed"] = (
        result["succeeded"]
        and result["ran"] == expected_ran
        and result["shard_tasks_done"] == dict(expected)
        and not result["store_problems"]
        and not result["differences"]
        and bool(common)
    )
    return result


def _run_alone(config: Path, work: Path, env: dict, logs: Path, stages: list[str]) -> dict:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / "run.log"
    return finish(start_run(config, env, log, stages, work=work), log, time.monotonic())


BUILD_ONCE = """
import sys, time
from pathlib import Path
import cptflow.tiny_model as tiny_model
from cptflow.models import resolve_model_path

original = tiny_model._build_into
def witnessed(*args, **kwargs):
    print("BUILDING", flush=True)  # the witness: this process did the build
    return original(*args, **kwargs)
tiny_model._build_into = witnessed
print(resolve_model_path("builtin:tiny-llama", cache_dir=Path(sys.argv[1])), flush=True)
"""


def model_cache(root: Path) -> dict:
    """Two processes ask for `builtin:tiny-llama` in one empty cache at once: one builds, the other
    waits on the cache's file lock and gets the same directory; nothing half built is left."""
    from cptflow.store import sha256_file

    cache = root / "model-cache-drill"
    shutil.rmtree(cache, ignore_errors=True)
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, "-P", "-c", BUILD_ONCE, str(cache)],
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    outputs, peaks = [], []
    for process in processes:
        out = process.stdout.read().decode()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        outputs.append((process.returncode, out))
        peaks.append(round(usage.ru_maxrss / 1024, 1))
    paths = {out.strip().splitlines()[-1] for code, out in outputs if code == 0 and out.strip()}
    models = sorted(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    leftovers = sorted(p.name for p in cache.iterdir() if p.name.startswith(".tmp"))
    weights = {sha256_file(Path(p) / "model.safetensors") for p in paths if (Path(p) / "model.safetensors").is_file()}
    result = {
        "succeeded": all(code == 0 for code, _ in outputs),
        "builds": sum(out.count("BUILDING") for _, out in outputs),
        "same_directory": len(paths) == 1,
        "models_in_cache": models,
        "half_built_left": leftovers,
        "same_weights": len(weights) == 1,
        "seconds": round(time.monotonic() - started, 1),
        "peak_rss_mb": max(peaks),
    }
    result["passed"] = (
        result["succeeded"]
        and result["builds"] == 1
        and result["same_directory"]
        and len(models) == 1
        and not leftovers
    )
    return result


PLAIN_CHILD = """
import json, sys
from cptflow.config import load_config
from cptflow.plan import plan_pipeline, run_data_stage_plain
cfg = load_config(sys.argv[1], sys.argv[2])
runs = plan_pipeline(cfg)
print(json.dumps({stage: run_data_stage_plain(runs[stage], cfg) for stage in sys.argv[3:]}), flush=True)
"""


def plain_pair(config: Path, reference: Path, work: Path, stages: list[str]) -> dict:
    """Two processes run the data stages of one config into one work directory at once, without
    Prefect (`run_data_stage_plain`, the stage lock's other caller): each stage "ran" in exactly one of
    them, the store is clean, and the outputs equal the reference's. The quick subset in `make test`."""
    shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, "-P", "-c", PLAIN_CHILD, str(config), str(work), *stages],
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    states, codes, errors = [], [], []
    for process in processes:
        out, err = process.communicate()
        codes.append(process.returncode)
        states.append(json.loads(out.decode().strip().splitlines()[-1]) if process.returncode == 0 else {})
        errors.append(err.decode(errors="replace")[-1500:] if process.returncode else "")
    ran = Counter(stage for run in states for stage, state in run.items() if state == "ran")
    result = {
        "succeeded": codes == [0, 0],
        "states": states,
        "ran": {s: ran[s] for s in stages},
        "store_problems": check_work_dir(config, work, stages),
        "differences": {s: p for s, p in compare_runs(config, reference, work, stages).items() if p},
        "seconds": round(time.monotonic() - started, 1),
        "errors": [e for e in errors if e],
    }
    result["passed"] = (
        result["succeeded"]
        and all(n == 1 for n in result["ran"].values())
        and not result["store_problems"]
        and not result["differences"]
    )
    return result


def rerun_all_cached(config: Path, work: Path, env: dict, logs: Path, stages: list[str]) -> dict:
    """A third run after the concurrent two: every stage comes back cached from the Prefect results
    both runs wrote for the same cache keys, even with the first stage's result record torn in half
    (a run killed while Prefect wrote it: its local storage writes in place, not atomically)."""
    storage = Path(env["PREFECT_HOME"]) / "storage"
    torn = storage / f"cptflow-{stages[0]}-{stage_path(config, work, stages[0]).name}"
    if torn.is_file():
        content = torn.read_bytes()
        torn.write_bytes(content[: len(content) // 2])
    run = _run_alone(config, work, env, logs, stages)
    return {
        "returncode": run["returncode"],
        "states": run["states"],
        "torn_result_record": torn.name if torn.exists() else None,
        "tail": run["tail"],
        "passed": run["returncode"] == 0 and {run["states"].get(s) for s in stages} == {"cached"},
    }


def drill(root: Path, scenarios: list[str], stages: list[str]) -> dict:
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(root)
    model = build_model(root, corpus)
    config_a = write_config(root / "config-a", drill_config(corpus, model, name="concurrency-a"))
    # Another quality threshold: clean is shared, quality and everything after it differ.
    config_b = write_config(
        root / "config-b",
        drill_config(corpus, model, name="concurrency-b", quality={"gopher_quality": {"min_words": 60}}),
    )
    report: dict = {"drill": "concurrency", "stages": stages, "scenarios": {}}
    prefect_scenarios = [s for s in scenarios if s != "model-cache"]
    if prefect_scenarios:
        server = start_prefect_server(root / "prefect")
        env = dict(child_env(), **server.env)
        try:
            if "same-config" in scenarios:
                result = same_config(root, config_a, env, stages)
                result["third_run"] = rerun_all_cached(
                    config_a, root / "same-config" / "shared", env, root / "same-config" / "logs-third", stages
                )
                result["passed"] = result["passed"] and result["third_run"]["passed"]
                report["scenarios"]["same-config"] = result
                print(summary_line("same-config", result), flush=True)
            if "two-configs" in scenarios:
                result = two_configs(root, config_a, config_b, env, stages)
                report["scenarios"]["two-configs"] = result
                print(summary_line("two-configs", result), flush=True)
        finally:
            server.stop()
    if "plain-pair" in scenarios:
        data_stages = [s for s in stages if s not in ("cpt", "sft", "evaluate")]
        alone = root / "plain-pair" / "reference"
        shutil.rmtree(alone, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-P", "-c", PLAIN_CHILD, str(config_a), str(alone), *data_stages],
            cwd=REPO,
            env=child_env(),
            check=True,
            capture_output=True,
        )
        result = plain_pair(config_a, alone, root / "plain-pair" / "shared", data_stages)
        report["scenarios"]["plain-pair"] = result
        print(summary_line("plain-pair", result), flush=True)
    if "model-cache" in scenarios:
        result = model_cache(root)
        report["scenarios"]["model-cache"] = result
        print(summary_line("model-cache", result), flush=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def summary_line(name: str, result: dict) -> str:
    return f"{name}: {'PASSED' if result['passed'] else 'FAILED'} " + json.dumps(
        {k: v for k, v in result.items() if k not in ("runs", "reference_run", "passed")}, default=str
    )


def format_table(report: dict) -> str:
    lines = [
        "| scenario | passed | runs | wall (s) | peak RSS per run (MB) | work done (per stage) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, r in report["scenarios"].items():
        runs = r.get("runs") or []
        if name == "plain-pair":
            done = ", ".join(f"{s} {n}" for s, n in r["ran"].items())
            lines.append(
                f"| {name} (no Prefect) | {'yes' if r['passed'] else 'NO'} | 2 | {r['seconds']} | | ran: {done} |"
            )
            continue
        if name == "model-cache":
            lines.append(
                f"| {name} | {'yes' if r['passed'] else 'NO'} | 2 | {r['seconds']} | "
                f"{r['peak_rss_mb']:.0f} | builds: {r['builds']} |"
            )
            continue
        done = ", ".join(f"{s} {n}" for s, n in (r.get("ran_once") or r.get("ran")).items())
        lines.append(
            f"| {name} | {'yes' if r['passed'] else 'NO'} | {len(runs)} | {max(x['seconds'] for x in runs)} | "
            f"{max(x['peak_rss_mb'] for x in runs):.0f} | ran: {done} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="scenarios to run")
    parser.add_argument(
        "--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages the runs run (a prefix of the DAG)"
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT / "concurrency")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    stages = [s for s in STAGES if s in args.stages]
    if stages != list(STAGES[: len(stages)]):
        parser.error("--stages must be a prefix of the DAG (clean, quality, ...): a stage needs its upstream")
    report = drill(args.root, args.only, stages)
    table = format_table(report)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(report, table=table), indent=2, default=str) + "\n")
    failed = [name for name, r in report["scenarios"].items() if not r["passed"]]
    print(f"failed: {failed or 'none'}; {report['seconds']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

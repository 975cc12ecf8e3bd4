"""Scale benchmark of the data stages: clean → quality → perplexity → mix → tokenize at growing corpus sizes.

A benchmark, not a timed test (the targets below are printed, never asserted). For each size it writes a
deterministic corpus (JSONL.gz files, a domain source of pharmacology abstracts and a general source of
web text, mean ≈ 2.4 k characters; ≈ 3% exact and ≈ 2% near duplicates, some planted across files; ≈ 4%
German/French/Spanish for the language filter), then runs every stage as its own
`cptflow run CONFIG --only STAGE` subprocess on each runner (the runners take turns stage by stage, so a
change in the machine's load hits them alike) and measures:

* wall seconds of the command, and the stage's own seconds from its manifest (`timings.seconds`; and
  `shard_seconds`, the shards' work summed over workers);
* CPU seconds of the whole process tree (getrusage(RUSAGE_CHILDREN) of a wrapper process, or the psutil
  samples where those are larger: a process nobody waited for is missing from getrusage);
* peak RSS of the biggest single process (psutil samples of the tree every 0.2 s, and the wrapper's
  ru_maxrss, which is the largest waited-for descendant's exact peak), and which process it was;
* documents in (the manifest's counts).

The same stages on a small base corpus (BASE_DOCUMENTS) measure each command's fixed cost (CLI import,
the Prefect client, the runner's workers, the tokenizer's load); "net" figures are the cost beyond it,
per document beyond it. Then per runner and stage: documents/s, CPU-seconds per 1 k documents, peak RSS,
and the growth exponents log(y2/y1)/log(n2/n1) between the smallest and the largest size, of time, CPU
and peak RSS, with the RSS slope in bytes per document and an extrapolation to 10 M documents. Each
stage's output files (manifest `outputs`, sha256) on every runner are compared with the first runner's:
they must be byte-identical.

By default one `prefect server start` serves the whole benchmark (PREFECT_API_URL, as in a deployment),
outside the measured tree; `--server temporary` lets every command start Prefect's temporary server, as a
bare `cptflow run` does (and then every pool or Dask worker starts one too).

Targets (issue 14): time exponent ≤ 1.1 for every stage; peak RSS of any process ≤ 2 GiB at 1 M
documents, not growing with N beyond the compact per-document summaries; Dask output byte-identical.
The perplexity stage runs `scorer: unigram` (the cheap CPU scorer), not the model: the model scorer is
a GPU job whose cost is per document by construction (benchmarks/bench_perplexity.py measures it).

    .venv/bin/python benchmarks/bench_scale.py [--sizes 100000 400000 1000000] [--runners processes dask]
        [--workers 2] [--work DIR] [--keep] [--docs-per-file N] [--stages clean quality ...]
        [--server own|temporary] [--json PATH]

Prints a side-by-side table, writes the full results as JSON (default WORK/bench_scale.json) and prints
a summary JSON object as its last line.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from cptflow.sample_data import generate as sample

REPO = Path(__file__).resolve().parents[1]
STAGES = ["clean", "quality", "perplexity", "mix", "tokenize"]
RUNNERS = ["processes", "dask", "threads"]
TARGET_TIME_EXPONENT = 1.1
TARGET_PEAK_RSS_BYTES = 2 * 1024**3  # at 1 M documents
EXTRAPOLATE_TO = 10_000_000
SAMPLE_SECONDS = 0.2
DOMAIN_FRACTION = 0.4  # of the documents; the rest is general web text
EXACT_DUPLICATES = 0.03
NEAR_DUPLICATES = 0.02
FOREIGN = 0.04
FOREIGN_LANGUAGES = ("de", "fr", "es")
DUPLICATE_WINDOW = 50_000  # a duplicate copies one of the previous 50 k documents of its source
PARTS = ((1, 0.35), (2, 0.5), (3, 0.15))  # generated documents joined into one: mean length ≈ 2.4 k chars
MiB = 1024**2
BASE_DOCUMENTS = 400  # the warm-up corpus: a stage's fixed cost is measured on it

# Runs the stage command, then reports the whole waited-for tree's CPU time and largest peak RSS.
MEASURE = (
    "import json, resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "json.dump({'rc': rc, 'cpu_s': u.ru_utime + u.ru_stime, 'maxrss_bytes': u.ru_maxrss * 1024},"
    " open(sys.argv[1], 'w'))\n"
    "sys.exit(rc)\n"
)


# ----------------------------------------------------------------------------------------------------
# Corpus: every document a pure function of (source, index), so files are generated in parallel and a
# duplicate can copy a document of an earlier file by regenerating it
# ----------------------------------------------------------------------------------------------------
def _kind(source: str, index: int) -> str:
    if index == 0:
        return "clean"
    u = random.Random(f"{source}:plan:{index}").random()
    if u < EXACT_DUPLICATES:
        return "exact_duplicate"
    if u < EXACT_DUPLICATES + NEAR_DUPLICATES:
        return "near_duplicate"
    if u < EXACT_DUPLICATES + NEAR_DUPLICATES + FOREIGN:
        return "foreign"
    return "clean"


def _parts(rng: random.Random) -> int:
    return rng.choices([n for n, _ in PARTS], weights=[w for _, w in PARTS])[0]


def _original_text(source: str, index: int) -> str:
    rng = random.Random(f"{source}:text:{index}")
    if source == "domain":
        return "\n\n".join(sample.make_abstract(rng) for _ in range(_parts(rng)))
    # Posts of different topics: two posts of one topic share its sentence templates, and Gopher's
    # duplicate 5-gram rule then drops about half of such pages (measured), which real pages are not.
    return "\n\n".join(sample.general_doc(rng, topic) for topic in rng.sample(sorted(sample.TOPICS), _parts(rng)))


def document_text(source: str, index: int) -> tuple[str, str]:
    """(kind, text) of document `index` of `source`."""
    kind = _kind(source, index)
    rng = random.Random(f"{source}:dirt:{index}")
    if kind == "foreign":
        lang = rng.choice(FOREIGN_LANGUAGES)
        corpus = "domain" if source == "domain" else "general"
        return kind, "\n\n".join(sample.foreign_doc(rng, lang, corpus) for _ in range(rng.randint(2, 4)))
    if kind == "clean":
        return kind, _original_text(source, index)
    while True:  # the copied document must itself be an original in the corpus
        original = rng.randrange(max(0, index - DUPLICATE_WINDOW), index)
        if _kind(source, original) == "clean":
            break
    text = _original_text(source, original)
    if kind == "near_duplicate":
        text = sample.near_duplicate(rng, text, "domain" if source == "domain" else "general")
    return kind, text


def write_corpus_file(job: tuple[str, Path, int, int]) -> dict:
    """One JSONL.gz file of documents [start, stop) of a source; deterministic bytes (gzip mtime 0)."""
    source, path, start, stop = job
    kinds: dict[str, int] = {}
    chars = 0
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz:
        for index in range(start, stop):
            kind, text = document_text(source, index)
            kinds[kind] = kinds.get(kind, 0) + 1
            chars += len(text)
            gz.write((json.dumps({"id": f"{source}-{index:08d}", "text": text}) + "\n").encode())
    os.replace(tmp, path)
    return {"kinds": kinds, "chars": chars}


def build_corpus(directory: Path, n_docs: int, docs_per_file: int, workers: int) -> dict:
    """directory/{domain,general}/part-NNNNN.jsonl.gz with n_docs documents in all; reused when complete."""
    done = directory / "corpus.json"
    if done.is_file():
        return json.loads(done.read_text())
    counts = {"domain": round(n_docs * DOMAIN_FRACTION)}
    counts["general"] = n_docs - counts["domain"]
    jobs = []
    for source, total in counts.items():
        (directory / source).mkdir(parents=True, exist_ok=True)
        for number, start in enumerate(range(0, total, docs_per_file)):
            path = directory / source / f"part-{number:05d}.jsonl.gz"
            jobs.append((source, path, start, min(total, start + docs_per_file)))
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        results = pool.map(write_corpus_file, jobs, chunksize=1)
    kinds: dict[str, int] = {}
    for result in results:
        for kind, n in result["kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    summary = {
        "documents": n_docs,
        "by_source": counts,
        "files": len(jobs),
        "kinds": dict(sorted(kinds.items())),
        "mean_chars": round(sum(r["chars"] for r in results) / n_docs),
        "bytes_gz": sum(job[1].stat().st_size for job in jobs),
        "seconds": round(time.perf_counter() - started, 1),
    }
    done.write_text(json.dumps(summary, indent=1))
    return summary


# ----------------------------------------------------------------------------------------------------
# The pipeline config
# ----------------------------------------------------------------------------------------------------
def write_config(path: Path, corpus: Path, work: Path, runner: str, workers: int) -> Path:
    runner_line = {
        "processes": f"{{kind: processes, max_workers: {workers}}}",
        "threads": f"{{kind: threads, max_workers: {workers}}}",
        "dask": f"{{kind: dask, dask_workers: {workers}}}",
    }[runner]
    path.write_text(
        f"""# Written by benchmarks/bench_scale.py
name: scale
work_dir: {work}
base_model: builtin:tiny-llama
runner: {runner_line}
sources:
  - {{name: domain, role: domain, paths: ["{corpus}/domain/*.jsonl.gz"]}}
  - {{name: general, role: general, paths: ["{corpus}/general/*.jsonl.gz"]}}
quality:
  language: {{allowed: [en]}}
perplexity: {{scorer: unigram, keep_band: [0, 95]}}
mix:
  domain_eval_documents: 60
  general_eval_documents: 60
  schedule: {{kind: linear, start: 0.5, end: 0.9}}
  budget_epochs: 1.0
tokenize: {{seq_len: 1024}}  # the context of builtin:tiny-llama
"""
    )
    return path


# ----------------------------------------------------------------------------------------------------
# Measuring one command
# ----------------------------------------------------------------------------------------------------
def _label(proc: psutil.Process, runner: str, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "bench wrapper"
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return "?"
    if "cptflow" in cmd and " run " in f" {cmd} ":
        return "cptflow run (flow)"
    if "uvicorn" in cmd or ("prefect" in cmd and "server" in cmd):
        return "prefect server"
    if "forkserver" in cmd or "resource_tracker" in cmd:
        return "multiprocessing helper"
    if "spawn_main" in cmd or "multiprocessing" in cmd or "dask" in cmd or "distributed" in cmd:
        return "dask worker" if runner == "dask" else "pool worker"
    return cmd[:60]


class TreeSampler(threading.Thread):
    """Samples RSS and CPU times of a process and all its descendants every SAMPLE_SECONDS."""

    def __init__(self, pid: int, runner: str):
        super().__init__(daemon=True)
        self.root, self.runner = pid, runner
        self.peak: dict[int, tuple[int, str]] = {}  # pid -> (peak rss, label)
        self.cpu: dict[int, float] = {}  # pid -> last seen user + system seconds
        # pid -> peak anonymous RSS (rss minus file-backed and shared pages: what memory pressure is made of)
        self.anon: dict[int, int] = {}
        self.stop = threading.Event()

    def sample(self) -> None:
        try:
            root = psutil.Process(self.root)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                memory = proc.memory_info()
                times = proc.cpu_times()
            except psutil.Error:
                continue
            rss = memory.rss
            self.anon[proc.pid] = max(self.anon.get(proc.pid, 0), rss - getattr(memory, "shared", 0))
            self.cpu[proc.pid] = times.user + times.system
            if rss > self.peak.get(proc.pid, (0, ""))[0]:
                self.peak[proc.pid] = (rss, self.peak.get(proc.pid, (0, ""))[1] or _label(proc, self.runner, self.root))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(SAMPLE_SECONDS)


def _on_sigterm(signum, frame) -> None:
    print(f"\nSIGTERM at {time.strftime('%H:%M:%S')}: stopping", file=sys.stderr, flush=True)
    raise KeyboardInterrupt  # unwinds like Ctrl-C: the server is stopped on the way out


def _die_with_parent() -> None:
    """In the server's child before exec: SIGTERM when the benchmark dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class PrefectServer:
    """One `prefect server start` for the whole benchmark (as a deployment has one), outside the measured
    tree; its CPU seconds during each command are read separately.

    Without it every `cptflow run` starts Prefect's temporary server, and so does every process-pool or
    Dask worker (they do not inherit the temporary server's address): three servers per command with
    2 workers, measured at about 18 of the 41 CPU-seconds of cleaning 40 documents (`--server temporary`).
    """

    def __init__(self, home: Path, log: Path):
        self.home, self.log = home, log

    def __enter__(self) -> "PrefectServer":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        cmd = [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--no-ui", "--analytics-off"]
        env = dict(os.environ, PREFECT_HOME=str(self.home))
        env.pop("PREFECT_API_URL", None)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=out, env=env, start_new_session=True, preexec_fn=_die_with_parent
            )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({self.proc.returncode}); see {self.log}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                time.sleep(1.0)
        raise RuntimeError(f"prefect server did not answer on {self.url} within 300 s; see {self.log}")

    def cpu_s(self) -> float:
        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            for proc in [root, *root.children(recursive=True)]:
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            pass
        return total

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(cmd: list[str], runner: str, log: Path, env: dict, server: PrefectServer | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        report = Path(handle.name)
    server_cpu = server.cpu_s() if server else 0.0
    started = time.perf_counter()
    with open(log, "ab") as out:
        out.write(("\n$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.Popen([sys.executable, "-c", MEASURE, str(report), *cmd], stdout=out, stderr=out, env=env)
        sampler = TreeSampler(proc.pid, runner)
        sampler.start()
        rc = proc.wait()
        sampler.stop.set()
        sampler.join()
    wall = time.perf_counter() - started
    server_cpu = server.cpu_s() - server_cpu if server else None
    rusage = json.loads(report.read_text()) if report.stat().st_size else {"cpu_s": 0.0, "maxrss_bytes": 0}
    report.unlink()
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}); the end of {log}:\n" + "\n".join(tail))
    biggest_pid = max(sampler.peak, key=lambda pid: sampler.peak[pid][0]) if sampler.peak else None
    sampled_rss, biggest = sampler.peak[biggest_pid] if biggest_pid else (0, "?")
    per_kind: dict[str, int] = {}
    for rss, label in sampler.peak.values():
        per_kind[label] = max(per_kind.get(label, 0), rss)
    sampled_cpu = sum(cpu for pid, cpu in sampler.cpu.items() if pid != proc.pid)
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(max(rusage["cpu_s"], sampled_cpu), 2),
        "cpu_s_rusage": round(rusage["cpu_s"], 2),
        "cpu_s_sampled": round(sampled_cpu, 2),
        "peak_rss_bytes": max(sampled_rss, rusage["maxrss_bytes"]),
        "peak_rss_sampled_bytes": sampled_rss,
        "peak_rss_rusage_bytes": rusage["maxrss_bytes"],
        "biggest_process": biggest,
        "peak_rss_by_process": {k: v for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
        "peak_anon_rss_bytes": max(sampler.anon.values(), default=0),
        "processes_seen": len(sampler.peak),
        "server_cpu_s": round(server_cpu, 2) if server_cpu is not None else None,
    }


def stage_manifest(work: Path, stage: str) -> dict:
    manifests = sorted((work / stage).glob("*/manifest.json"))
    if len(manifests) != 1:
        raise RuntimeError(f"expected one committed {stage} under {work / stage}, found {len(manifests)}")
    return json.loads(manifests[0].read_text())


def stage_row(run_dir: Path, size: int, runner: str, stage: str, figures: dict) -> dict:
    manifest = stage_manifest(run_dir, stage)
    counts, timings = manifest.get("counts") or {}, manifest.get("timings") or {}
    return {
        "size": size,
        "runner": runner,
        "stage": stage,
        "docs_in": counts.get("in", 0),
        "docs_kept": counts.get("kept", 0),
        "stage_s": timings.get("seconds"),
        "shard_s": timings.get("shard_seconds"),  # the shards' own work summed: no start-up, no later steps
        "shards": len(manifest.get("shards") or []),
        **figures,
    }


def cptflow_command(config: Path, stage: str) -> list[str]:
    return [str(Path(sys.executable).with_name("cptflow")), "run", str(config), "--only", stage]


# ----------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------
def exponent(n1: float, y1: float | None, n2: float, y2: float | None) -> float | None:
    if y1 is None or y2 is None or min(n1, y1, n2, y2) <= 0 or n1 == n2:
        return None
    return round(math.log(y2 / y1) / math.log(n2 / n1), 3)


def derive(row: dict, base: dict) -> dict:
    """Rates, and net figures: what the command cost beyond the same stage on the base (warm-up) corpus,
    per document beyond the base's documents. None where it cost no more (noise of a loaded machine)."""
    docs = row["docs_in"] or 1
    extra_docs = row["docs_in"] - base["docs_in"]

    def net(key: str) -> float | None:
        return round(row[key] - base[key], 2) if row[key] > base[key] and extra_docs > 0 else None

    row = dict(row, base_docs_in=base["docs_in"], net_wall_s=net("wall_s"), net_cpu_s=net("cpu_s"))
    return dict(
        row,
        docs_per_s=round(row["docs_in"] / row["stage_s"], 1) if row["stage_s"] else None,
        docs_per_s_wall=round(row["docs_in"] / row["wall_s"], 1),
        cpu_s_per_1k_docs=round(row["cpu_s"] / docs * 1000, 3),
        net_cpu_s_per_1k_docs=round(row["net_cpu_s"] / extra_docs * 1000, 3) if row["net_cpu_s"] else None,
    )


def growth(small: dict, large: dict) -> dict:
    n1, n2 = small["size"], large["size"]
    m1, m2 = small["docs_in"] - small["base_docs_in"], large["docs_in"] - large["base_docs_in"]
    rss1, rss2 = small["peak_rss_bytes"], large["peak_rss_bytes"]
    out = {
        "from": n1,
        "to": n2,
        "time_exponent_stage": exponent(n1, small["stage_s"], n2, large["stage_s"]),
        "time_exponent_shards": exponent(n1, small["shard_s"] or 0, n2, large["shard_s"] or 0),
        "time_exponent_wall": exponent(n1, small["wall_s"], n2, large["wall_s"]),
        # net: the cost beyond the base corpus against the documents beyond it
        "time_exponent_net_wall": exponent(m1, small["net_wall_s"], m2, large["net_wall_s"]),
        "cpu_exponent": exponent(n1, small["cpu_s"], n2, large["cpu_s"]),
        "cpu_exponent_net": exponent(m1, small["net_cpu_s"], m2, large["net_cpu_s"]),
        "rss_exponent": exponent(n1, rss1, n2, rss2),
        "rss_bytes_per_doc": round((rss2 - rss1) / (n2 - n1), 1),
        # per kind of process: the flow holds the global decisions' summaries, workers the shards' work
        "rss_bytes_per_doc_by_process": {
            kind: round((large["peak_rss_by_process"][kind] - small["peak_rss_by_process"][kind]) / (n2 - n1), 1)
            for kind in small["peak_rss_by_process"]
            if kind in large["peak_rss_by_process"] and kind != "bench wrapper"
        },
    }
    # Extrapolations, labelled as such: time by the measured power law, RSS along its measured line.
    scale = EXTRAPOLATE_TO / n2
    for key, value, exp in (
        ("stage_s", large["stage_s"], out["time_exponent_stage"]),
        ("net_cpu_s", large["net_cpu_s"], out["cpu_exponent_net"]),
    ):
        out[f"extrapolated_10m_{key}"] = round(value * scale**exp, 1) if exp is not None and value else None
    out["extrapolated_10m_cpu_s_linear"] = (  # the line through the two points, for comparison
        round(large["cpu_s"] + (large["cpu_s"] - small["cpu_s"]) / (n2 - n1) * (EXTRAPOLATE_TO - n2), 1)
    )
    out["extrapolated_10m_peak_rss_bytes"] = round(rss2 + max(0.0, out["rss_bytes_per_doc"]) * (EXTRAPOLATE_TO - n2))
    out["meets_time_target"] = out["time_exponent_stage"] is not None and (
        out["time_exponent_stage"] <= TARGET_TIME_EXPONENT
    )
    return out


def print_table(results: list[dict], runners: list[str], stages: list[str], sizes: list[int]) -> None:
    by = {(r["runner"], r["stage"], r["size"]): r for r in results}
    head = f"{'stage':<11}{'docs':>9} |" + "|".join(f" {runner:^53} " for runner in runners)
    sub = f"{'':<11}{'':>9} |" + "|".join(
        f" {'docs/s':>8} {'wall s':>7} {'CPU s/1k':>9} {'net':>6} {'peak MiB':>9} {'biggest':<9} " for _ in runners
    )
    print(head)
    print(sub)
    print("-" * len(sub))
    for stage in stages:
        for size in sizes:
            cells = []
            for runner in runners:
                r = by.get((runner, stage, size))
                if r is None:
                    cells.append(" " * 55)
                    continue
                cells.append(
                    f" {r['docs_per_s'] or 0:>8.0f} {r['wall_s']:>7.1f} {r['cpu_s_per_1k_docs']:>9.2f} "
                    f"{r['net_cpu_s_per_1k_docs'] or 0:>6.2f} {r['peak_rss_bytes'] / MiB:>9.0f} "
                    f"{r['biggest_process'][:9]:<9} "
                )
            print(f"{stage:<11}{by.get((runners[0], stage, size), {}).get('docs_in', ''):>9} |" + "|".join(cells))
    print("docs/s: documents in / the stage's own seconds (manifest); wall s: the whole `cptflow run --only` command;")
    print("CPU s/1k: CPU seconds of the process tree per 1,000 documents in; net: beyond the same stage on the")
    print(f"{BASE_DOCUMENTS}-document base corpus, per 1,000 documents beyond it;")
    print("peak MiB: the biggest single process's peak RSS, and which process it was.")


def print_growth(growths: dict, runners: list[str], stages: list[str]) -> None:
    columns = [
        ("stage exp", "time_exponent_stage"),
        ("shard exp", "time_exponent_shards"),
        ("wall exp", "time_exponent_wall"),
        ("net wall", "time_exponent_net_wall"),
        ("CPU exp", "cpu_exponent"),
        ("net CPU", "cpu_exponent_net"),
        ("RSS exp", "rss_exponent"),
    ]
    print(
        f"\n{'stage':<11}{'runner':<10}"
        + "".join(f"{name:>10}" for name, _ in columns)
        + f"{'RSS B/doc':>10}{'10M s':>9}{'10M MiB':>9}"
    )
    for stage in stages:
        for runner in runners:
            g = growths.get(runner, {}).get(stage)
            if not g:
                continue
            fmt = lambda v, w, p=2: f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
            print(
                f"{stage:<11}{runner:<10}"
                + "".join(fmt(g[key], 10) for _, key in columns)
                + f"{g['rss_bytes_per_doc']:>10.0f}{fmt(g['extrapolated_10m_stage_s'], 9, 0)}"
                + f"{g['extrapolated_10m_peak_rss_bytes'] / MiB:>9.0f}"
            )
    print(
        f"Growth exponents log(y2/y1)/log(n2/n1) (target for time ≤ {TARGET_TIME_EXPONENT}) of: the stage's own seconds"
        " (manifest), the shards' summed work seconds, the command's wall seconds (gross, and net of the fixed cost),"
        " the tree's CPU seconds (gross, net), the biggest process's peak RSS; B/doc: that peak's growth per document."
        " 10M columns are extrapolations (power law for the stage's seconds, straight line for RSS), not measurements."
    )


def compare_outputs(work_a: Path, work_b: Path, stages: list[str]) -> dict:
    out = {}
    for stage in stages:
        a, b = stage_manifest(work_a, stage), stage_manifest(work_b, stage)
        files_a = {e["path"]: e["sha256"] for e in a["outputs"]}
        files_b = {e["path"]: e["sha256"] for e in b["outputs"]}
        differing = sorted(p for p in files_a.keys() | files_b.keys() if files_a.get(p) != files_b.get(p))
        out[stage] = {
            "files": len(files_a),
            "identical": not differing and a["fingerprint"] == b["fingerprint"],
            "same_fingerprint": a["fingerprint"] == b["fingerprint"],
            "differing": differing[:20],
        }
    return out


def code_state() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    mix = REPO / "tasks" / "mix.py"
    return {
        "commit": git("log", "-1", "--format=%h"),
        "dirty_files": len(git("status", "--porcelain", "--untracked-files=no").splitlines()),
        "tasks/mix.py diff": git("diff", "--stat", "tasks/mix.py"),
        "tasks/mix.py sha256": hashlib.sha256(mix.read_bytes()).hexdigest()[:12] if mix.is_file() else None,
    }


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_000_000])
    parser.add_argument("--runners", nargs="+", choices=RUNNERS, default=["processes", "dask"])
    parser.add_argument("--workers", type=int, default=2, help="processes / Dask workers, and corpus writers")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cptflow-bench-scale")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and stage outputs")
    parser.add_argument(
        "--docs-per-file",
        type=int,
        default=None,
        help="documents per input file (one shard each); default min(20000, smallest size / 4), same at every size",
    )
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES)
    parser.add_argument(
        "--server",
        choices=["own", "temporary"],
        default="own",
        help="own: one `prefect server start` for the benchmark (PREFECT_API_URL), outside the measured tree; "
        "temporary: every command (and every worker) starts Prefect's temporary server, as a bare `cptflow run`",
    )
    parser.add_argument("--json", type=Path, default=None, help="full results (default WORK/bench_scale.json)")
    args = parser.parse_args(argv)
    args.sizes = sorted(set(args.sizes))
    chosen = [s for s in STAGES if s in args.stages]
    args.stages = STAGES[: STAGES.index(chosen[-1]) + 1]  # a stage needs its upstream
    args.docs_per_file = args.docs_per_file or max(100, min(20_000, args.sizes[0] // 4))
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        PREFECT_HOME=str(args.work / "prefect-home"),  # its own database: no other run's history in it
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("PREFECT_API_URL", None)
    state = code_state()
    print(f"code: commit {state['commit']}; tasks/mix.py: {state['tasks/mix.py diff'] or 'unchanged'}")
    print(
        f"work: {args.work}; sizes {args.sizes}; runners {args.runners}; {args.workers} workers; "
        f"{args.docs_per_file} docs/file; Prefect server: {args.server}"
    )
    # Build builtin:tiny-llama before anything is timed (first use trains it, about a minute).
    from cptflow.models import resolve_model_path

    resolve_model_path("builtin:tiny-llama")
    signal.signal(signal.SIGTERM, _on_sigterm)  # said, with its time: a stray kill otherwise leaves no trace
    with contextlib.ExitStack() as stack:
        server = None
        if args.server == "own":
            server = stack.enter_context(PrefectServer(Path(env["PREFECT_HOME"]), args.work / "prefect-server.log"))
            env["PREFECT_API_URL"] = server.url
            print(f"Prefect server: {server.url}")
        full = run_benchmark(args, env, server)
    full["code"] = state
    out = args.json or args.work / "bench_scale.json"
    out.write_text(json.dumps(full, indent=1))
    print(f"\nfull results: {out}")
    summary = {k: v for k, v in full.items() if k not in ("corpora", "bases", "results", "growth", "identity")}
    summary["growth"] = {
        runner: {
            stage: {k: g[k] for k in ("time_exponent_stage", "cpu_exponent_net", "rss_bytes_per_doc")}
            for stage, g in per.items()
        }
        for runner, per in full["growth"].items()
    }
    print(json.dumps(summary))
    return full


def run_benchmark(args: argparse.Namespace, env: dict, server: PrefectServer | None) -> dict:
    work, sizes, stages = args.work, args.sizes, args.stages

    # Warm-up and fixed cost per runner and stage: the stages on a small corpus (BASE_DOCUMENTS, files of
    # 100), clean once unmeasured first (the server database fills, caches warm), then measured with
    # --force, and every later stage measured: what a stage command costs besides its documents (CLI
    # import, the Prefect client, the runner's workers and their start, the tokenizer's load). Net figures
    # are the cost beyond these.
    warm_corpus = work / "corpus-warmup"
    build_corpus(warm_corpus, BASE_DOCUMENTS, 100, 1)
    bases: dict[str, dict[str, dict]] = {runner: {} for runner in args.runners}
    for runner in args.runners:
        warm = work / f"warmup-{runner}"
        config = write_config(work / f"warmup-{runner}.yaml", warm_corpus, warm, runner, args.workers)
        measure(cptflow_command(config, "clean"), runner, work / "warmup.log", env, server)
        for stage in stages:
            cmd = cptflow_command(config, stage) + (["--force", "clean"] if stage == "clean" else [])
            bases[runner][stage] = stage_row(
                warm, BASE_DOCUMENTS, runner, stage, measure(cmd, runner, work / "warmup.log", env, server)
            )
        cost = bases[runner]
        print(
            f"fixed cost per command, {runner} ({BASE_DOCUMENTS} documents): "
            + ", ".join(f"{st} {cost[st]['wall_s']:.0f} s / {cost[st]['cpu_s']:.0f} CPU s" for st in stages)
        )
        if not args.keep:
            shutil.rmtree(warm, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(warm_corpus, ignore_errors=True)

    results, corpora, identity = [], {}, {}
    for size in sizes:
        corpus = work / f"corpus-{size}"
        corpora[size] = build_corpus(corpus, size, args.docs_per_file, args.workers)
        c = corpora[size]
        print(
            f"\n== {size:,} documents: {c['files']} files, mean {c['mean_chars']} chars, {c['kinds']} "
            f"({c['bytes_gz'] / MiB:.0f} MiB gz, written in {c['seconds']} s)"
        )
        configs = {
            runner: write_config(
                work / f"run-{size}-{runner}.yaml", corpus, work / f"run-{size}-{runner}", runner, args.workers
            )
            for runner in args.runners
        }
        # Runners take turns stage by stage, so a change in the machine's load hits both alike.
        for stage in stages:
            for runner in args.runners:
                run_dir = work / f"run-{size}-{runner}"
                log = work / f"run-{size}-{runner}.log"
                figures = measure(cptflow_command(configs[runner], stage), runner, log, env, server)
                row = derive(stage_row(run_dir, size, runner, stage, figures), bases[runner][stage])
                results.append(row)
                print(
                    f"  {runner:<10}{stage:<11} in {row['docs_in']:>8} kept {row['docs_kept']:>8}  "
                    f"{row['stage_s']:>7.1f} s stage {row['wall_s']:>7.1f} s wall  "
                    f"{row['docs_per_s'] or 0:>7.0f} docs/s  "
                    f"{row['cpu_s_per_1k_docs']:>6.2f} CPU s/1k  peak {row['peak_rss_bytes'] / MiB:>6.0f} MiB "
                    f"({row['biggest_process']})",
                    flush=True,
                )
        reference = args.runners[0]
        identity[size] = {
            runner: compare_outputs(work / f"run-{size}-{reference}", work / f"run-{size}-{runner}", stages)
            for runner in args.runners[1:]
        }
        for runner, stages_cmp in identity[size].items():
            verdict = ", ".join(
                f"{stage} {'identical' if v['identical'] else 'DIFFERS ' + str(v['differing'][:3])}"
                f" ({v['files']} files)"
                for stage, v in stages_cmp.items()
            )
            print(f"  {runner} vs {reference} outputs: {verdict}")
        if not args.keep:
            shutil.rmtree(corpus, ignore_errors=True)
            for runner in args.runners:
                shutil.rmtree(work / f"run-{size}-{runner}", ignore_errors=True)

    by = {(r["runner"], r["stage"], r["size"]): r for r in results}
    growths = {
        runner: {stage: growth(by[runner, stage, sizes[0]], by[runner, stage, sizes[-1]]) for stage in stages}
        for runner in args.runners
        if len(sizes) > 1
    }
    print()
    print_table(results, args.runners, stages, sizes)
    if growths:
        print_growth(growths, args.runners, stages)
    all_identical = all(
        v["identical"] for per_size in identity.values() for cmp in per_size.values() for v in cmp.values()
    )

    def worst(key: str) -> float | None:
        values = [g[key] for per in growths.values() for g in per.values() if g[key] is not None]
        return max(values) if values else None

    largest = [r for r in results if r["size"] == sizes[-1]]
    return {
        "benchmark": "data_stages_at_scale",
        "sizes": sizes,
        "runners": args.runners,
        "workers": args.workers,
        "docs_per_file": args.docs_per_file,
        "prefect_server": args.server,
        "perplexity_scorer": "unigram",
        "max_stage_time_exponent": worst("time_exponent_stage"),
        "max_net_wall_exponent": worst("time_exponent_net_wall"),
        "max_net_cpu_exponent": worst("cpu_exponent_net"),
        "target_time_exponent": TARGET_TIME_EXPONENT,
        "max_peak_rss_mib": round(max(r["peak_rss_bytes"] for r in results) / MiB),
        "peak_rss_at_largest_mib": round(max(r["peak_rss_bytes"] for r in largest) / MiB),
        "max_rss_bytes_per_doc": worst("rss_bytes_per_doc"),
        "outputs_identical_across_runners": all_identical if len(args.runners) > 1 else None,
        "corpora": corpora,
        "base_documents": BASE_DOCUMENTS,
        "bases": bases,
        "results": results,
        "growth": growths,
        "identity": identity,
    }


if __name__ == "__main__":
    main()

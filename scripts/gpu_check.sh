#!/usr/bin/env bash
# The GPU figures in one call (docs/benchmarks.md, "GPU check"):
#   scripts/gpu_check.sh OUTDIR            on a bare GPU machine (python3 with CUDA torch; gpu_wheels/ beside)
#   scripts/gpu_check.sh --dry-run OUTDIR  the same steps on a CPU with tiny sizes (tests/test_gpu_check.py)
# Writes OUTDIR/summary.json and one log per step; exits 1 when a step failed or ran over its cap.
# PYTHON picks the interpreter (default python3: on the GPU machine, the one that holds torch).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" run "$@"

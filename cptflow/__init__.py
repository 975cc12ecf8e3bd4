"""cptflow: continued pretraining of LLMs as a Prefect DAG (clean → quality → perplexity → mix → tokenize → cpt → sft → evaluate)."""

import os as _os

__version__ = "0.1.0"

# A temporary Prefect server needs 15-30 s to start on a small machine; the default 20 s is too tight.
_os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
_os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

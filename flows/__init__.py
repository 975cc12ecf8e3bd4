"""The only Prefect code of cptflow: the pipeline flow, its deployments and its failure reports."""

import os as _os

# Before prefect is imported. A temporary Prefect server needs 15-30 s to start on a small machine;
# the default 20 s is too tight.
_os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
_os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Every flow run sends a heartbeat (Prefect's floor: 30 s); the crash automation (flows/crashes.py)
# marks a run whose heartbeats stop Crashed.
_os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")

"""Reliability and security drills (issue 7): one module per drill, each run with `python -m drills.<name>`."""

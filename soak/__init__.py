"""The concurrency soak behind `make soak` (workload.py: the organisations and the operations;
run.py: its own database and localstripe, the run, the checks, the figures)."""

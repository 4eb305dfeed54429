"""The benchmark suite behind `make bench` (DESIGN §9): each path against its ceiling, same run,
same machine. Start with `python -m bench.run`."""

"""`make bench`: sets up a database and gunicorn of its own, runs each benchmark against its
ceiling, prints the table, and cleans up. Exit status 0 when everything ran and every answer was
right (targets missed or not: it is a report), 1 otherwise.

    python -m bench.run [--only ingest|jobs|recharge|usage|close] [--events N] [--subscriptions N]
"""

import argparse
import functools
import os
import sys
import time
import traceback

from bench import ingest, jobs, period_close, recharge, usage_page
from bench.report import Outcome, table
from bench.server import GUNICORN_WORKERS, bench_server

# usage runs after the API paths, so they still measure tables without its 10 million events;
# close runs last, as it moves billing time to 2027.
BENCHMARKS = {
    "ingest": ingest.run,
    "jobs": jobs.run,
    "recharge": recharge.run,
    "usage": usage_page.run,
    "close": period_close.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(BENCHMARKS), help="run one benchmark")
    parser.add_argument(
        "--events",
        type=int,
        default=usage_page.EVENTS,
        help=f"usage events to bulk-load for the usage benchmark (default {usage_page.EVENTS:,})",
    )
    parser.add_argument(
        "--subscriptions",
        type=int,
        default=period_close.SUBSCRIPTIONS,
        help=f"subscriptions to generate for the period-close benchmark (default {period_close.SUBSCRIPTIONS:,})",
    )
    args = parser.parse_args(argv)
    if args.events < 1 or args.subscriptions < 1:
        parser.error("--events and --subscriptions must be at least 1")
    benchmarks = {
        **BENCHMARKS,
        "usage": functools.partial(usage_page.run, events=args.events),
        "close": functools.partial(period_close.run, subscriptions=args.subscriptions),
    }
    names = [args.only] if args.only else list(BENCHMARKS)

    began = time.monotonic()
    load = os.getloadavg()[0]
    if load > 0.5:
        print(
            f"note: the load average is {load:.1f} before we start: other processes are using the "
            f"{os.cpu_count()} cores, so the figures will be lower and noisier than on a quiet machine"
        )
    results = Outcome()
    try:
        with bench_server() as server:
            print(
                f"gunicorn ({GUNICORN_WORKERS} workers) on 127.0.0.1:{server.port}; benchmarks: {', '.join(names)}"
            )
            for name in names:
                outcome = benchmarks[name](server)
                results.rows += outcome.rows
                results.failures += outcome.failures
    except Exception:  # noqa: BLE001 - reported, and the exit status says so
        results.failures.append(traceback.format_exc())

    if results.rows:
        print()
        print(table(results.rows))
    print(f"\n({time.monotonic() - began:.0f} s in all)")
    if results.failures:
        print("\nFAILED:", *results.failures, sep="\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

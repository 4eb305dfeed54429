"""Jobs: POST /api/v1/jobs then POST /api/v1/jobs/{id}/complete, as fast as a few clients go,
against GET /healthz (one query) on the same gunicorn, driven by the same client the same way."""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.client import Connection, Session, Tally, in_processes, percentile
from bench.report import Outcome, Row, rate
from bench.server import Server, api_get, read_catalog, usage_by_product

CLIENTS = 4
WARMUP_SECONDS = 3.0
ROUNDS = 3  # the two paths take turns, so a neighbour's load falls on both alike
DURATION_SECONDS = 15.0  # measured, per path, over all rounds
PAGES = 10
JOB = json.dumps(
    {
        "product": "parse",
        "mode": "base",
        "ocr": False,
        "pages": PAGES,
        "file_type": "pdf",
        "file_size": 100_000,
    }
).encode()
RATIO_TARGET = 0.4
P99_TARGET_MS = 25.0


@dataclass(frozen=True)
class Measure:
    tally: Tally
    per_second: float
    p50_ms: float
    p99_ms: float

    @property
    def client_us(self) -> float:
        """The client's CPU time per request, in microseconds."""
        return self.tally.extra["client_cpu"] / max(1, self.tally.requests) * 1e6


def drive(server: Server, scenario: Callable[[Session], None], warmup: float, duration: float) -> Tally:
    """Runs `scenario` in a loop in CLIENTS processes for `warmup` seconds, then `duration`
    seconds in which the requests that end are counted."""
    start = time.monotonic() + 0.1 + warmup
    stop = start + duration
    headers = {"Authorization": f"Bearer {server.api_key}"}

    def client(_: int) -> Tally:
        session = Session(Connection(server.port, headers), start, stop)
        while time.monotonic() < stop:
            scenario(session)
        session.conn.close()
        session.tally.extra["client_cpu"] = time.process_time()  # this forked process's own
        return session.tally

    total = Tally()
    for tally in in_processes(client, CLIENTS):
        total.merge(tally)
    return total


def measure(server: Server, scenarios: dict[str, Callable[[Session], None]]) -> dict[str, Measure]:
    """Warms each scenario up, then runs them in turns, ROUNDS times, DURATION_SECONDS each in all."""
    tallies = {name: drive(server, scenario, WARMUP_SECONDS, 0) for name, scenario in scenarios.items()}
    for _ in range(ROUNDS):
        for name, scenario in scenarios.items():
            tallies[name].merge(drive(server, scenario, 0.5, DURATION_SECONDS / ROUNDS))
    measures = {}
    for name, tally in tallies.items():
        latencies = sorted(tally.latencies)
        measures[name] = Measure(
            tally=tally,
            per_second=len(latencies) / DURATION_SECONDS,
            p50_ms=percentile(latencies, 0.50) * 1000,
            p99_ms=percentile(latencies, 0.99) * 1000,
        )
    return measures


def job_pair(s: Session) -> None:
    """One pair; once started, a job is always completed, so no hold is left behind."""
    status, body = s.call("POST", "/api/v1/jobs", JOB, expect=201)
    if status != 201:
        return
    status, _ = s.call("POST", f"/api/v1/jobs/{json.loads(body)['id']}/complete", b"{}", expect=200)
    if status == 200:
        s.tally.extra["completed"] = s.tally.extra.get("completed", 0) + 1


def healthz(s: Session) -> None:
    s.call("GET", "/healthz")


def _check_exact(completed: int, per_page: int, before: tuple, after: tuple) -> list[str]:
    """Every completed pair charged exactly its pages, in the balance and in usage; no hold left."""
    (balance_before, usage_before), (balance_after, usage_after) = before, after
    charged, pages = completed * PAGES * per_page, completed * PAGES
    used = balance_after["credits_used_this_period"] - balance_before["credits_used_this_period"]
    spent = balance_before["credits_remaining"] - balance_after["credits_remaining"]
    parse_before, parse_after = usage_before.get("parse", (0, 0)), usage_after.get("parse", (0, 0))
    usage = (parse_after[0] - parse_before[0], parse_after[1] - parse_before[1])
    if (used, spent, usage) == (charged, charged, (charged, pages)):
        return []
    return [
        f"jobs: {completed:,} pairs should charge {charged:,} credits for {pages:,} pages; "
        f"credits_used_this_period rose by {used:,}, credits_remaining fell by {spent:,}, "
        f"usage of parse rose by {usage[0]:,} credits and {usage[1]:,} pages"
    ]


def run(server: Server) -> Outcome:
    outcome = Outcome()
    per_page = read_catalog(server.database_url)[("parse", "base")]
    before = api_get(server, "/api/v1/balance"), usage_by_product(server)
    measures = measure(server, {"jobs": job_pair, "healthz": healthz})
    after = api_get(server, "/api/v1/balance"), usage_by_product(server)

    ours, ceiling = measures["jobs"], measures["healthz"]
    completed = ours.tally.extra.get("completed", 0)
    for name, m in measures.items():
        if m.tally.failed:
            outcome.failures.append(
                f"{name}: {m.tally.failed} unexpected answers, e.g.\n  " + "\n  ".join(m.tally.examples)
            )
    outcome.failures += _check_exact(completed, per_page, before, after)

    ratio = ours.per_second / ceiling.per_second if ceiling.per_second else 0.0
    print(
        f"jobs:    {ours.per_second:,.0f} requests/s = {ours.per_second / 2:,.0f} pairs/s, "
        f"p50 {ours.p50_ms:.1f} ms, p99 {ours.p99_ms:.1f} ms "
        f"({CLIENTS} clients, {DURATION_SECONDS:.0f} s in {ROUNDS} turns; client CPU "
        f"{ours.client_us:.0f} µs a request; {completed:,} pairs completed in all)"
    )
    print(
        f"healthz: {ceiling.per_second:,.0f} requests/s, p50 {ceiling.p50_ms:.1f} ms, "
        f"p99 {ceiling.p99_ms:.1f} ms (client CPU {ceiling.client_us:.0f} µs a request); ratio {ratio:.2f}"
    )
    outcome.rows += [
        Row(
            "jobs (requests/s)",
            rate(ours.per_second),
            f"{rate(ceiling.per_second)} (healthz)",
            f"{ratio:.2f}",
            f">= {RATIO_TARGET}",
            ratio >= RATIO_TARGET,
        ),
        Row(
            "jobs p99 latency (ms)",
            f"{ours.p99_ms:.1f}",
            f"{ceiling.p99_ms:.1f} (healthz)",
            "-",
            f"< {P99_TARGET_MS:.0f} ms",
            ours.p99_ms < P99_TARGET_MS,
        ),
    ]
    return outcome

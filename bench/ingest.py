"""Ingestion: batches of 1,000 usage events through POST /api/v1/usage/events, against the same rows
inserted straight into the same table with psycopg executemany (DESIGN §9). Then the API's balance
and usage must add up to exactly what was sent."""

import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg

from bench.client import Connection, Session, Tally, in_processes, percentile
from bench.report import Outcome, Row, rate
from bench.server import Server, api_get, read_catalog, usage_by_product

BATCHES = 60
BATCH_SIZE = 1_000
CLIENTS = 2
ROUNDS = 3
OPERATIONS = [("parse", "base"), ("extract", "base"), ("parse", "audio")]
RATIO_TARGET = 0.5
CEILING_SQL = (
    "INSERT INTO usage_usageevent (org_id, event_id, product, mode, units, credits, timestamp, charged_on) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
)


@dataclass(frozen=True)
class Event:
    id: str
    product: str
    mode: str
    units: int


def make_batches(prefix: str, count: int, rng: random.Random) -> list[list[Event]]:
    return [
        [Event(f"{prefix}-{b}-{i}", *rng.choice(OPERATIONS), rng.randint(1, 50)) for i in range(BATCH_SIZE)]
        for b in range(count)
    ]


class Sent:
    """Credits and units sent, by product, to check the API's answers against."""

    def __init__(self, costs: dict[tuple[str, str], int]):
        self.costs = costs
        self.events = 0
        self.by_product: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def add(self, batches: list[list[Event]]) -> None:
        for batch in batches:
            for e in batch:
                row = self.by_product[e.product]
                row[0] += e.units * self.costs[(e.product, e.mode)]
                row[1] += e.units
                self.events += 1

    @property
    def credits(self) -> int:
        return sum(credits for credits, _ in self.by_product.values())


def _api_bodies(batches: list[list[Event]]) -> list[bytes]:
    timestamp = datetime.now(UTC).isoformat()
    return [
        json.dumps(
            {
                "events": [
                    {
                        "id": e.id,
                        "product": e.product,
                        "mode": e.mode,
                        "units": e.units,
                        "timestamp": timestamp,
                    }
                    for e in batch
                ]
            }
        ).encode()
        for batch in batches
    ]


def _post_batches(server: Server, bodies: list[bytes], start: float) -> tuple[float, Tally]:
    """Sends bodies i, i + CLIENTS, … from client i, all clients beginning at `start`; returns
    (when the last answer came, what the clients saw)."""
    headers = {"Authorization": f"Bearer {server.api_key}"}

    def client(i: int) -> tuple[float, Tally]:
        session = Session(Connection(server.port, headers), float("-inf"), float("inf"))
        accepted = duplicates = 0
        time.sleep(max(0.0, start - time.monotonic()))
        for body in bodies[i::CLIENTS]:
            status, answer = session.call("POST", "/api/v1/usage/events", body, expect=202)
            if status == 202:
                counts = json.loads(answer)
                accepted += counts["accepted"]
                duplicates += counts["duplicates"]
        session.conn.close()
        session.tally.extra = {"accepted": accepted, "duplicates": duplicates}
        return time.monotonic(), session.tally

    ends, total = [], Tally()
    for end, tally in in_processes(client, CLIENTS):
        ends.append(end)
        total.merge(tally)
    return max(ends), total


def _insert_batches(database_url: str, rows: list[list[tuple]], start: float) -> float:
    """The ceiling: batches i, i + CLIENTS, … from process i, one transaction each."""

    def client(i: int) -> float:
        with psycopg.connect(database_url) as conn, conn.cursor() as cur:
            time.sleep(max(0.0, start - time.monotonic()))
            for batch in rows[i::CLIENTS]:
                cur.executemany(CEILING_SQL, batch)
                conn.commit()
        return time.monotonic()

    return max(in_processes(client, CLIENTS))


def _ceiling_rows(
    org_id: int, costs: dict[tuple[str, str], int], batches: list[list[Event]]
) -> list[list[tuple]]:
    now = datetime.now(UTC)
    return [
        [
            (org_id, e.id, e.product, e.mode, e.units, e.units * costs[(e.product, e.mode)], now, now.date())
            for e in b
        ]
        for b in batches
    ]


def _check_exact(server: Server, sent: Sent, tally: Tally) -> list[str]:
    problems = []
    if tally.extra.get("accepted") != sent.events or tally.extra.get("duplicates"):
        problems.append(f"ingest: sent {sent.events:,} events, the API answered {tally.extra}")
    used = api_get(server, "/api/v1/balance")["credits_used_this_period"]
    if used != sent.credits:
        problems.append(f"ingest: sent {sent.credits:,} credits, balance shows {used:,} used this period")
    expected = {product: tuple(v) for product, v in sent.by_product.items()}
    reported = usage_by_product(server)
    if reported != expected:
        problems.append(f"ingest: usage by product {reported} != sent {expected}")
    return problems


def run(server: Server) -> Outcome:
    outcome = Outcome()
    costs = read_catalog(server.database_url)
    rng = random.Random(20251123)
    sent = Sent(costs)

    # Everything is built before the clock starts: JSON bodies for the API, row tuples for the
    # ceiling (fresh ids). One warm-up batch per client first, for each path.
    warm_api = make_batches("warm", CLIENTS, rng)
    api_batches = make_batches("api", BATCHES, rng)
    sent.add(warm_api + api_batches)
    warm_bodies, bodies = _api_bodies(warm_api), _api_bodies(api_batches)
    warm_rows = _ceiling_rows(server.org_id, costs, make_batches("ceiling-warm", CLIENTS, rng))
    rows = _ceiling_rows(server.org_id, costs, make_batches("ceiling", BATCHES, rng))

    _, tally = _post_batches(server, warm_bodies, time.monotonic())
    _insert_batches(server.database_url, warm_rows, time.monotonic())
    tally.latencies.clear()

    # The two paths take turns, so a neighbour's load falls on both alike.
    ours_seconds = ceiling_seconds = 0.0
    per_round = BATCHES // ROUNDS
    for r in range(ROUNDS):
        chunk = slice(r * per_round, (r + 1) * per_round if r < ROUNDS - 1 else BATCHES)
        start = time.monotonic() + 0.1
        end, round_tally = _post_batches(server, bodies[chunk], start)
        ours_seconds += end - start
        tally.merge(round_tally)
        start = time.monotonic() + 0.1
        ceiling_seconds += _insert_batches(server.database_url, rows[chunk], start) - start
    ours, ceiling = BATCHES * BATCH_SIZE / ours_seconds, BATCHES * BATCH_SIZE / ceiling_seconds

    if tally.failed:
        outcome.failures.append(
            f"ingest: {tally.failed} unexpected answers, e.g.\n  " + "\n  ".join(tally.examples)
        )
    else:
        outcome.failures += _check_exact(server, sent, tally)

    ratio = ours / ceiling
    batch_ms = sorted(tally.latencies)
    print(
        f"ingest:  {ours:,.0f} events/s through the API ({BATCHES} batches of {BATCH_SIZE:,}, "
        f"{CLIENTS} clients, {ROUNDS} turns; p50 {percentile(batch_ms, 0.5) * 1000:.0f} ms a batch); "
        f"ceiling {ceiling:,.0f} events/s (psycopg executemany); ratio {ratio:.2f}"
    )
    if not outcome.failures:
        print(f"ingest:  exact: {sent.events:,} events, {sent.credits:,} credits, in balance and usage")
    outcome.rows.append(
        Row(
            "ingest (events/s)",
            rate(ours),
            f"{rate(ceiling)} (executemany)",
            f"{ratio:.2f}",
            f">= {RATIO_TARGET}",
            ratio >= RATIO_TARGET,
        )
    )
    return outcome

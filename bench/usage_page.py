"""The Usage page (Settings → Billing → Usage) of an organisation with 10 million usage events
(issue 5): p95 under 100 ms and at most 3× a trivial page on the same gunicorn, driven by the same
client the same way, signed in as the organisation's owner.

The ceiling is GET /healthz (one query), as for the jobs benchmark: the strictest reading of "a
trivial page". A trivial page of the site itself is measured and its ratio printed beside it: the
password-reset form requested signed in, which has nothing of its own to do but goes through the
same middleware, session, user and organisation lookup and base template as every signed-in page.

The events go straight into PostgreSQL with INSERT … SELECT FROM generate_series (not through the
API), spread over the last 90 days, in one transaction that takes the table's indexes off for the
load and builds them again after it (PostgreSQL's advice for bulk loads); the daily rollups are then
built from the events with one GROUP BY, and one query checks that the two agree. The page is measured over its default range (30 days) and
over all 90 days. PostgreSQL's per-table scan counters show that the page never reads
usage_usageevent: its charts read the rollups.
"""

import http.client
import re
import time
import urllib.parse
from datetime import UTC, date, datetime, timedelta
from http.cookies import SimpleCookie

import psycopg

from bench.client import Connection, Session, Tally, in_processes, percentile
from bench.report import Outcome, Row
from bench.server import Server

EVENTS = 10_000_000
DAYS = 90
DEFAULT_DAYS = 30  # the page's default range, today included
CHUNK = 2_500_000  # rows per INSERT, all in one transaction
# Where the events go, in percent: (product, mode, weight). Audio is Parse's only.
MIX = (
    ("parse", "base", 30),
    ("parse", "advanced", 10),
    ("parse", "ocr", 8),
    ("parse", "audio", 4),
    ("extract", "base", 15),
    ("extract", "ocr", 4),
    ("classify", "base", 10),
    ("classify", "ocr", 2),
    ("split", "base", 6),
    ("split", "ocr", 2),
    ("index", "base", 8),
    ("index", "ocr", 1),
)
CLIENTS = 2  # one per gunicorn worker, for every path alike: latency is server time, not queueing
WARMUP = 10  # requests per client and path, not counted
REQUESTS = 200  # counted, per path
ROUNDS = 4  # the paths take turns, so a neighbour's load falls on all of them alike
P95_TARGET_MS = 100.0
RATIO_TARGET = 3.0
STATS_WAIT_SECONDS = 20.0  # a backend flushes its table counters within ~10 s of going idle
USAGE_PATH = "/settings/billing/usage/"
TRIVIAL_PATH = "/accounts/password-reset/"
HEALTHZ_PATH = "/healthz"
TOTAL_RE = re.compile(rb'data-testid="usage-total">([^<]*)<')

INSERT_EVENTS = """
INSERT INTO usage_usageevent (org_id, event_id, product, mode, units, credits, timestamp, charged_on)
SELECT %(org)s, 'bench-' || lpad(g.n::text, 9, '0'), s.product, s.mode, g.units, g.units * o.credits_per_unit,
       (g.day + make_interval(secs => g.second)) AT TIME ZONE 'UTC', g.day
FROM (
    SELECT n,
           %(today)s::date - (n %% %(days)s)::int AS day,
           1 + abs(hashint8extended(n, 1) %% 50)::int AS units,
           1 + abs(hashint8extended(n, 2) %% 100)::int AS slot,
           abs(hashint8extended(n, 3) %% 86400)::int AS second
    FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS n
) AS g
JOIN unnest(%(products)s::text[], %(modes)s::text[]) WITH ORDINALITY AS s(product, mode, slot)
    ON s.slot = g.slot
JOIN usage_operation AS o ON o.product = s.product AND o.mode = s.mode
"""
INSERT_ROLLUPS = """
INSERT INTO usage_usagerollup (org_id, day, product, mode, credits, units)
SELECT org_id, charged_on, product, mode, sum(credits), sum(units)
FROM usage_usageevent
WHERE org_id = %(org)s AND event_id LIKE 'bench-%%'
GROUP BY org_id, charged_on, product, mode
ON CONFLICT (org_id, day, product, mode) DO UPDATE
SET credits = usage_usagerollup.credits + excluded.credits, units = usage_usagerollup.units + excluded.units
"""
ROLLUP_TOTALS = (
    "SELECT count(*), coalesce(sum(credits), 0), coalesce(sum(units), 0) "
    "FROM usage_usagerollup WHERE org_id = %(org)s"
)
# Events loaded against what the rollups gained, in one query.
AGREE = f"""
SELECT e.n, e.credits, e.units, r.n, r.credits, r.units
FROM (SELECT count(*) AS n, coalesce(sum(credits), 0) AS credits, coalesce(sum(units), 0) AS units
      FROM usage_usageevent WHERE org_id = %(org)s AND event_id LIKE 'bench-%%') AS e,
     ({ROLLUP_TOTALS}) AS r(n, credits, units)
"""
# usage_usageevent's indexes, with the unique or primary-key constraint each one backs, if any.
INDEXES = """
SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid), c.conname, pg_get_constraintdef(c.oid)
FROM pg_index AS i
LEFT JOIN pg_constraint AS c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid AND c.contype IN ('p', 'u')
WHERE i.indrelid = 'usage_usageevent'::regclass
ORDER BY c.contype = 'p' DESC NULLS LAST, c.conname IS NULL, 1
"""
FOREIGN_KEYS = """
SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
WHERE conrelid = 'usage_usageevent'::regclass AND contype = 'f' ORDER BY conname
"""
# What the table's indexes and constraints are, to check they come back the same.
SCHEMA = """
SELECT 'index', pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = 'usage_usageevent'::regclass
UNION ALL
SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'usage_usageevent'::regclass
ORDER BY 1, 2
"""
SCANS = """
SELECT relname, coalesce(seq_scan, 0) + coalesce(idx_scan, 0)
FROM pg_stat_user_tables WHERE relname IN ('usage_usageevent', 'usage_usagerollup')
"""


def _mix() -> tuple[list[str], list[str]]:
    """100 slots, each a (product, mode): slot k of the INSERT is products[k - 1], modes[k - 1]."""
    products, modes = [], []
    for product, mode, weight in MIX:
        products += [product] * weight
        modes += [mode] * weight
    assert len(products) == 100
    return products, modes


def _take_off_indexes(conn: psycopg.Connection) -> list[str]:
    """Drops usage_usageevent's indexes, unique and foreign-key constraints (the table's own: not
    NULL and CHECK stay) and returns the statements that put them back as they were. PostgreSQL's
    advice for a bulk load: building an index once is far cheaper than 10 million insertions into
    seven of them, and re-adding the foreign key checks every row in one query."""
    rows = conn.execute(INDEXES).fetchall()
    restore = []
    for index, index_sql, constraint, constraint_sql in rows:
        if constraint:
            conn.execute(f'ALTER TABLE usage_usageevent DROP CONSTRAINT "{constraint}"')
            restore.append(f'ALTER TABLE usage_usageevent ADD CONSTRAINT "{constraint}" {constraint_sql}')
        else:
            conn.execute(f'DROP INDEX "{index}"')
            restore.append(index_sql)
    for constraint, constraint_sql in conn.execute(FOREIGN_KEYS).fetchall():
        conn.execute(f'ALTER TABLE usage_usageevent DROP CONSTRAINT "{constraint}"')
        restore.append(f'ALTER TABLE usage_usageevent ADD CONSTRAINT "{constraint}" {constraint_sql}')
    return restore


def bulk_load(server: Server, events: int, today: date) -> None:
    """`events` usage events over the `DAYS` days up to `today`, and their rollups, in one
    transaction; raises if the rollups do not add up to the events."""
    products, modes = _mix()
    params = {"org": server.org_id, "today": today, "days": DAYS, "products": products, "modes": modes}
    began = time.monotonic()
    with psycopg.connect(server.database_url) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET maintenance_work_mem = '1GB'")  # the index builds sort in memory
        conn.execute("SET work_mem = '64MB'")
        before = conn.execute(ROLLUP_TOTALS, params).fetchone()
        schema_before = conn.execute(SCHEMA).fetchall()
        restore = _take_off_indexes(conn)
        for first in range(1, events + 1, CHUNK):
            last = min(events, first + CHUNK - 1)
            conn.execute(INSERT_EVENTS, {**params, "first": first, "last": last})
            print(f"usage:   {last:,} events inserted ({time.monotonic() - began:.0f} s)", flush=True)
        inserted = time.monotonic()
        for statement in restore:
            conn.execute(statement)
        if conn.execute(SCHEMA).fetchall() != schema_before:
            raise RuntimeError(
                "usage: usage_usageevent's indexes and constraints did not come back as they were"
            )
        indexed = time.monotonic()
        print(
            f"usage:   {len(restore)} indexes and constraints rebuilt ({indexed - began:.0f} s)", flush=True
        )
        conn.execute("ANALYZE usage_usageevent")  # without statistics, the GROUP BY sorts all the rows
        conn.execute(INSERT_ROLLUPS, params)
        e_n, e_credits, e_units, r_n, r_credits, r_units = conn.execute(AGREE, params).fetchone()
        gained = (r_credits - before[1], r_units - before[2])
        if e_n != events or gained != (e_credits, e_units):
            raise RuntimeError(
                f"usage: {e_n:,} events loaded (wanted {events:,}) with {e_credits:,} credits and "
                f"{e_units:,} units, but the rollups gained {gained[0]:,} credits and {gained[1]:,} units"
            )
        conn.commit()
        committed = time.monotonic()
        conn.autocommit = True
        # As autovacuum would soon after such a load, so that it does not run during the requests.
        conn.execute("VACUUM usage_usageevent")
        conn.execute("ANALYZE usage_usagerollup")
        conn.execute("SELECT pg_stat_force_next_flush()")  # our own scans of the events, counted now
    vacuumed = time.monotonic()
    print(
        f"usage:   bulk load of {events:,} events in {committed - began:.0f} s, one transaction: "
        f"INSERT … SELECT {inserted - began:.0f} s ({events / (inserted - began):,.0f} rows/s), indexes "
        f"and constraints {indexed - inserted:.0f} s, {r_n - before[0]:,} rollup rows from the events "
        f"and the check that they agree ({e_credits:,} credits, {e_units:,} units) "
        f"{committed - indexed:.0f} s; then VACUUM {vacuumed - committed:.0f} s"
    )


def sign_in(server: Server) -> str:
    """Signs the owner in through the login form; the Cookie header that carries the session."""
    jar: dict[str, str] = {}

    def request(method: str, body: str | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            cookie = "; ".join(f"{k}={v}" for k, v in jar.items())
            conn.request(method, "/accounts/login/", body, {**(headers or {}), "Cookie": cookie})
            response = conn.getresponse()
            answer = response.read()
            for header in response.headers.get_all("Set-Cookie") or []:
                jar.update({name: morsel.value for name, morsel in SimpleCookie(header).items()})
            return response.status, answer
        finally:
            conn.close()

    status, _ = request("GET")
    if status != 200 or "csrftoken" not in jar:
        raise RuntimeError(f"usage: GET /accounts/login/ answered {status} without a csrftoken cookie")
    form = urllib.parse.urlencode(
        {
            "username": server.owner_email,
            "password": server.owner_password,
            "csrfmiddlewaretoken": jar["csrftoken"],
        }
    )
    status, answer = request("POST", form, {"Content-Type": "application/x-www-form-urlencoded"})
    if status != 302 or "sessionid" not in jar:
        raise RuntimeError(
            f"usage: signing in answered {status}, not a redirect with a session: {answer[:300]!r}"
        )
    return f"csrftoken={jar['csrftoken']}; sessionid={jar['sessionid']}"


def _drive(server: Server, cookie: str, path: str, per_client: int, counted: bool) -> Tally:
    """`per_client` GETs of `path` from each of CLIENTS processes at once."""

    def client(_: int) -> Tally:
        window = (float("-inf"), float("inf")) if counted else (0.0, 0.0)
        session = Session(Connection(server.port, {"Cookie": cookie}), *window)
        for _ in range(per_client):
            session.call("GET", path)
        session.conn.close()
        return session.tally

    total = Tally()
    for tally in in_processes(client, CLIENTS):
        total.merge(tally)
    return total


def _scans(database_url: str) -> dict[str, int]:
    """Sequential plus index scans so far, by table: usage_usageevent and usage_usagerollup."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        return dict(conn.execute(SCANS).fetchall())


def _range_total(database_url: str, org_id: int, start: date, end: date) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(credits), 0) FROM usage_usagerollup WHERE org_id = %s AND day BETWEEN %s AND %s",
            (org_id, start, end),
        ).fetchone()
    return row[0]


def _check_page(server: Server, cookie: str, path: str, expected: int) -> list[str]:
    """The page answers 200 and shows the range's total: what the rollups (so the events) hold."""
    conn = Connection(server.port, {"Cookie": cookie})
    try:
        status, body = conn.request("GET", path)
    finally:
        conn.close()
    if status != 200:
        return [f"usage: GET {path} answered {status}: {body[:300]!r}"]
    found = TOTAL_RE.search(body)
    shown = int(re.sub(rb"\D", b"", found.group(1)) or b"-1") if found else None
    if shown != expected:
        return [f"usage: GET {path} shows a total of {shown} credits, the rollups hold {expected:,}"]
    return []


def run(server: Server, events: int = EVENTS) -> Outcome:
    outcome = Outcome()
    today = datetime.now(UTC).date()  # billing time: the bench database has no clock offset
    bulk_load(server, events, today)

    first = today - timedelta(days=DAYS - 1)
    paths = {
        f"usage, {DEFAULT_DAYS} days": USAGE_PATH,
        f"usage, {DAYS} days": f"{USAGE_PATH}?{urllib.parse.urlencode({'start': first, 'end': today})}",
        "trivial page": TRIVIAL_PATH,
        "healthz": HEALTHZ_PATH,
    }
    page_names = [name for name in paths if name not in ("trivial page", "healthz")]
    totals = [
        _range_total(server.database_url, server.org_id, today - timedelta(days=DEFAULT_DAYS - 1), today),
        _range_total(server.database_url, server.org_id, first, today),
    ]
    cookie = sign_in(server)
    scans_before = _scans(server.database_url)

    for name, total in zip(page_names, totals, strict=True):
        outcome.failures += _check_page(server, cookie, paths[name], total)
    tallies = {name: _drive(server, cookie, path, WARMUP, counted=False) for name, path in paths.items()}
    per_client = REQUESTS // (ROUNDS * CLIENTS)
    for _ in range(ROUNDS):
        for name, path in paths.items():
            tallies[name].merge(_drive(server, cookie, path, per_client, counted=True))
    page_requests = 2 + sum(tallies[name].requests for name in page_names)

    for name, tally in tallies.items():
        if tally.failed:
            outcome.failures.append(
                f"{name}: {tally.failed} unexpected answers, e.g.\n  " + "\n  ".join(tally.examples)
            )

    # The workers' counters reach pg_stat_user_tables some seconds after they go idle: wait until
    # the rollups show the page's reads (at least one a request), then look at the events.
    deadline = time.monotonic() + STATS_WAIT_SECONDS
    while True:
        scans_after = _scans(server.database_url)
        rollup_reads = scans_after["usage_usagerollup"] - scans_before["usage_usagerollup"]
        if rollup_reads >= page_requests or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    event_reads = scans_after["usage_usageevent"] - scans_before["usage_usageevent"]
    print(
        f"usage:   {page_requests:,} page requests read usage_usagerollup {rollup_reads:,} times and "
        f"usage_usageevent {event_reads:,} times (pg_stat_user_tables seq_scan + idx_scan)"
    )
    if rollup_reads < page_requests:
        outcome.failures.append(
            f"usage: after {page_requests:,} page requests pg_stat_user_tables counts only {rollup_reads:,} "
            f"reads of usage_usagerollup, so its counters cannot tell whether the page reads the events"
        )
    if event_reads:
        outcome.failures.append(
            f"usage: the page read usage_usageevent ({event_reads:,} scans): charts must read rollups"
        )

    p = {}
    for name, tally in tallies.items():
        latencies = sorted(tally.latencies)
        p[name] = (percentile(latencies, 0.50) * 1000, percentile(latencies, 0.95) * 1000, len(latencies))
    trivial_p95, healthz_p95 = p["trivial page"][1], p["healthz"][1]
    for name in paths:
        p50, p95, n = p[name]
        print(
            f"usage:   {name}: p50 {p50:.1f} ms, p95 {p95:.1f} ms ({n} requests, {CLIENTS} clients, signed in)"
        )
    for name in page_names:
        p95 = p[name][1]
        ratio = p95 / healthz_p95 if healthz_p95 else float("inf")
        print(
            f"usage:   {name}: p95 {p95 / trivial_p95 if trivial_p95 else float('inf'):.2f}x the trivial page's"
        )
        outcome.rows.append(
            Row(
                f"{name} p95 (ms, {events / 1e6:g}M events)",
                f"{p95:.1f}",
                f"{healthz_p95:.1f} (healthz)",
                f"{ratio:.2f}",
                f"<= {RATIO_TARGET:g}x and p95 < {P95_TARGET_MS:.0f} ms",
                ratio <= RATIO_TARGET and p95 < P95_TARGET_MS,
            )
        )
    outcome.rows.append(
        Row(
            "usage page reads of usage_usageevent",
            f"{event_reads:,}",
            "-",
            "-",
            "0 (charts read rollups)",
            event_reads == 0 and rollup_reads >= page_requests,
        )
    )
    return outcome

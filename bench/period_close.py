"""Period close (issue 6): 100,000 subscriptions whose periods all end at the same moment, bulk
generated in SQL, then closed by `manage.py billing_tick --at` (the real command, timed from start
to exit); PDF render p50 for a one-page invoice beside it, rendered off that path.

The mix: 60% Free (never invoiced), 30% Starter (a third of them with 1,252 credits of overage),
10% Pro. Every period runs 1 Jan – 1 Feb 2027 with its plan lot, its grant and usage entries and
its account balance consistent, as the services would have left them. Afterwards the run is
checked: every period closed once, one invoice per paid subscription with the amount computed
here in SQL, numbers gapless, and every balance equal to its lots and its ledger.
"""

import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

import psycopg

from bench.report import Outcome, Row
from bench.server import ROOT, Server, app_env

SUBSCRIPTIONS = 100_000
TARGET_SECONDS = 120.0
PDF_RENDERS = 15
PERIOD_START = datetime(2027, 1, 1, tzinfo=UTC)
CLOSE_AT = datetime(2027, 2, 1, tzinfo=UTC)
PREFIX = "Close "  # the generated organisations' names

# One row per generated organisation: its plan and the credits it used in January.
GENERATE = """
CREATE TEMP TABLE bench_close AS
SELECT o.id AS org_id, p.id AS plan_id, p.code, p.monthly_credits,
       CASE WHEN p.code = 'free' THEN (g %% 10) * 1000
            WHEN p.code = 'starter' AND g %% 3 = 0 THEN 41252
            WHEN p.code = 'starter' THEN 20000
            ELSE 100000 END AS used
FROM accounts_organisation AS o
CROSS JOIN LATERAL (SELECT substr(o.name, %(skip)s)::int AS g) AS n
JOIN accounts_plan AS p ON p.code = CASE WHEN g %% 10 < 6 THEN 'free' WHEN g %% 10 < 9 THEN 'starter' ELSE 'pro' END
WHERE o.name LIKE %(like)s
"""
STATEMENTS = [
    """INSERT INTO accounts_billingperiod
         (start, "end", monthly_credits, credits_used, overage_credits, org_id, plan_id)
       SELECT %(start)s, %(end)s, monthly_credits, used, greatest(used - monthly_credits, 0), org_id, plan_id
       FROM bench_close""",
    """ALTER TABLE bench_close ADD COLUMN period_id bigint""",
    """UPDATE bench_close AS b SET period_id = p.id FROM accounts_billingperiod AS p
       WHERE p.org_id = b.org_id""",
    """INSERT INTO accounts_subscription
         (anchor_day, overage_enabled, created_at, current_period_id, org_id, plan_id)
       SELECT 1, true, %(start)s, period_id, org_id, plan_id FROM bench_close""",
    """INSERT INTO usage_creditaccount (org_id, balance, overage_held, running_jobs)
       SELECT org_id, monthly_credits - least(used, monthly_credits), 0, 0 FROM bench_close""",
    """INSERT INTO usage_creditlot (bucket, source, granted, remaining, expires_at, created_at, org_id, period_id)
       SELECT 1, 'period:' || period_id, monthly_credits, monthly_credits - least(used, monthly_credits),
              %(end)s, %(start)s, org_id, period_id
       FROM bench_close""",
    """INSERT INTO usage_ledgerentry (kind, credits, reason, created_at, lot_id, org_id, period_id)
       SELECT 'grant', l.granted, 'plan credits', %(start)s, l.id, l.org_id, l.period_id
       FROM usage_creditlot AS l JOIN bench_close AS b ON b.period_id = l.period_id
       UNION ALL
       SELECT 'usage', l.remaining - l.granted, 'usage', %(start)s, l.id, l.org_id, l.period_id
       FROM usage_creditlot AS l JOIN bench_close AS b ON b.period_id = l.period_id
       WHERE l.remaining < l.granted""",
    """ANALYZE""",
]

# What the close must have done, each query answering one number or one row.
CHECKS = {
    "periods closed at the close": """
        SELECT count(*) FROM accounts_billingperiod AS p JOIN bench_close AS b ON b.period_id = p.id
        WHERE p.closed_at = %(end)s""",
    "subscriptions on a period from the close": """
        SELECT count(*) FROM accounts_subscription AS s JOIN accounts_billingperiod AS p
          ON p.id = s.current_period_id JOIN bench_close AS b ON b.org_id = s.org_id
        WHERE p.start = %(end)s""",
}
# Invoices of the generated organisations: count and total, against the plan fee plus overage
# × $1.25 / 1,000 rounded half-up to the cent (1,252 credits: 156.5 cents → 157).
INVOICES = """
SELECT (SELECT count(*) FROM invoices_invoice AS i JOIN bench_close AS b ON b.org_id = i.org_id
        WHERE i.number IS NOT NULL),
       (SELECT coalesce(sum(i.total_cents), 0) FROM invoices_invoice AS i JOIN bench_close AS b
          ON b.org_id = i.org_id WHERE i.number IS NOT NULL),
       (SELECT count(*) FROM bench_close WHERE code <> 'free'),
       (SELECT coalesce(sum(CASE code WHEN 'starter' THEN 5000 ELSE 50000 END
                  + floor(greatest(used - monthly_credits, 0) * 0.125 + 0.5)), 0)
        FROM bench_close WHERE code <> 'free')
"""
NUMBERS = """
SELECT count(*), count(DISTINCT number), min(substr(number, 10)::int), max(substr(number, 10)::int)
FROM invoices_invoice WHERE number LIKE 'INV-2027-%%'
"""
LEDGER = """
SELECT count(*) FROM bench_close AS b
JOIN usage_creditaccount AS a ON a.org_id = b.org_id
LEFT JOIN (SELECT org_id, sum(remaining) AS s FROM usage_creditlot GROUP BY org_id) AS l ON l.org_id = b.org_id
LEFT JOIN (SELECT org_id, sum(credits) AS s FROM usage_ledgerentry WHERE lot_id IS NOT NULL GROUP BY org_id)
  AS e ON e.org_id = b.org_id
WHERE a.balance <> coalesce(l.s, 0) OR a.balance <> coalesce(e.s, 0) OR a.balance <> b.monthly_credits
"""

# Runs in `manage.py shell -c`: renders one invoice's PDF PDF_RENDERS times, prints the seconds.
PDF_TIMER = """
import time
from invoices import services
from invoices.models import Invoice, InvoicePdf
invoice = Invoice.objects.filter(number__isnull=False, org__name__startswith={prefix!r}).order_by("pk").first()
services.invoice_pdf(invoice=invoice)  # warm: fonts and stylesheets load once per process
for _ in range({renders}):
    InvoicePdf.objects.filter(invoice=invoice).delete()
    began = time.perf_counter()
    body = bytes(services.invoice_pdf(invoice=invoice).content)
    print("BENCH-PDF", time.perf_counter() - began, len(body), body[:5].decode())
"""


def _generate(database_url: str, n: int) -> None:
    params = {"start": PERIOD_START, "end": CLOSE_AT, "skip": len(PREFIX) + 1, "like": PREFIX + "%"}
    with psycopg.connect(database_url) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute(
            "INSERT INTO accounts_organisation (name, created_at, stripe_customer_id) "
            "SELECT %(prefix)s || g, %(start)s, '' FROM generate_series(1, %(n)s) AS g",
            {"prefix": PREFIX, "start": PERIOD_START, "n": n},
        )
        conn.execute(GENERATE, params)
        for statement in STATEMENTS:
            conn.execute(statement, params)
        conn.commit()


def _check(database_url: str, n: int) -> list[str]:
    params = {"end": CLOSE_AT, "skip": len(PREFIX) + 1, "like": PREFIX + "%"}
    problems = []
    with psycopg.connect(database_url) as conn:
        conn.execute(GENERATE, params)
        conn.execute("ALTER TABLE bench_close ADD COLUMN period_id bigint")
        conn.execute(
            "UPDATE bench_close AS b SET period_id = p.id FROM accounts_billingperiod AS p "
            "WHERE p.org_id = b.org_id AND p.start = %(start)s",
            {"start": PERIOD_START},
        )
        for what, sql in CHECKS.items():
            (count,) = conn.execute(sql, params).fetchone()
            if count != n:
                problems.append(f"period close: {count:,} {what}, wanted {n:,}")
        count, total, want_count, want_total = conn.execute(INVOICES).fetchone()
        if (count, total) != (want_count, want_total):
            problems.append(
                f"period close: {count:,} invoices for {total:,} cents, wanted {want_count:,} for {want_total:,}"
            )
        numbered, distinct, first, last = conn.execute(NUMBERS).fetchone()
        if not (numbered == distinct == last - first + 1 and first == 1):
            problems.append(
                f"period close: {numbered:,} numbers, {distinct:,} distinct, from {first} to {last}: not gapless"
            )
        (wrong,) = conn.execute(LEDGER).fetchone()
        if wrong:
            problems.append(f"period close: {wrong:,} organisations whose balance, lots and ledger disagree")
    return problems


def _pdf_p50() -> tuple[float, list[str]]:
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", PDF_TIMER.format(prefix=PREFIX, renders=PDF_RENDERS)],
        cwd=ROOT,
        env=app_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("BENCH-PDF")]
    if done.returncode != 0 or len(lines) != PDF_RENDERS:
        return 0.0, [f"pdf render failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"]
    if any(magic != "%PDF-" for *_, magic in lines):
        return 0.0, ["pdf render: the output is not a PDF"]
    return statistics.median(float(seconds) for _, seconds, *_ in lines), []


def run(server: Server, subscriptions: int = SUBSCRIPTIONS) -> Outcome:
    outcome = Outcome()
    began = time.monotonic()
    _generate(server.database_url, subscriptions)
    print(
        f"close:   {subscriptions:,} subscriptions generated ({time.monotonic() - began:.0f} s)", flush=True
    )

    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "manage.py", "billing_tick", "--at", CLOSE_AT.isoformat()],
        cwd=ROOT,
        env=app_env(),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    seconds = time.monotonic() - began
    print(f"close:   {done.stdout.strip()} ({seconds:.1f} s)", flush=True)
    if done.returncode != 0:
        outcome.failures.append(f"billing_tick failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        return outcome
    outcome.failures += _check(server.database_url, subscriptions)

    p50, failures = _pdf_p50()
    outcome.failures += failures
    outcome.rows.append(
        Row(
            path=f"period close, {subscriptions:,} subscriptions (`billing_tick`)",
            ours=f"{seconds:.1f} s ({subscriptions / seconds:,.0f} subscriptions/s)",
            ceiling=f"{TARGET_SECONDS:.0f} s budget",
            ratio=f"{seconds / TARGET_SECONDS:.2f} of it",
            target=f"< {TARGET_SECONDS:.0f} s",
            met=seconds < TARGET_SECONDS,
        )
    )
    outcome.rows.append(
        Row(
            path="PDF render, one-page invoice (WeasyPrint)",
            ours=f"p50 {p50 * 1000:.0f} ms",
            ceiling="-",
            ratio="-",
            target="printed",
            met=True,
        )
    )
    return outcome

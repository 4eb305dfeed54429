"""`make soak`: the concurrency soak on a PostgreSQL database of its own and a fresh localstripe.

Creates the database (dropped first if it exists, dropped again at the end unless --keep), migrates
it, makes the organisations of soak/workload.py, runs the operations in threads, settles what is
left pending, checks every invariant of tests/invariants.py (localstripe's PaymentIntents
included), and prints the figures. Exit status 0 when there is no anomaly, 1 otherwise, 2 when it
could not run (PostgreSQL missing, too few free connections).

    python -m soak.run [--threads 50] [--operations 10000] [--stripe-budget 250] [--months 6]
                       [--seed 2027] [--database-url postgres://postgres@127.0.0.1:5432/billing_soak]
                       [--keep]

Invoice PDFs are not rendered by WeasyPrint here (a stand-in stores a few bytes per invoice and
status): rendering hundreds of them would cost minutes of the two cores and prove nothing about
money. Celery runs eagerly (a threshold recharge runs in the thread whose charge crossed the
threshold, after its commit) and e-mails stay in memory.
"""

import argparse
import os
import sys
import time
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/billing_soak"


def _parse(argv):
    from soak.plan import SoakPlan

    default = SoakPlan()
    parser = argparse.ArgumentParser(prog="python -m soak.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=default.threads)
    parser.add_argument(
        "--operations", type=int, default=default.operations, help="in all, over every thread"
    )
    parser.add_argument(
        "--stripe-budget",
        type=int,
        default=default.stripe_budget,
        help="purchases, upgrades and refunds that may reach localstripe (recharges and invoices come on top)",
    )
    parser.add_argument("--months", type=int, default=default.months, help="of billing time the ticks cover")
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--database-url", default=os.environ.get("SOAK_DATABASE_URL", DEFAULT_DATABASE_URL))
    parser.add_argument("--keep", action="store_true", help="keep the database for a look afterwards")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.operations < args.threads or args.months < 1 or args.stripe_budget < 0:
        parser.error("need threads ≥ 1, operations ≥ threads, months ≥ 1 and a budget ≥ 0")
    plan = SoakPlan(args.threads, args.operations, args.stripe_budget, args.months, args.seed)
    return args, plan


def _admin_url(database_url: str) -> tuple[str, str]:
    """(the server's maintenance database URL, the soak database's name)."""
    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    if not name.replace("_", "").isalnum():
        raise SystemExit(f"The database name {name!r} must be letters, digits and underscores.")
    return urlunsplit(parts._replace(path="/postgres")), name


def _fresh_database(database_url: str, threads: int) -> None:
    import psycopg

    admin, name = _admin_url(database_url)
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            free = conn.execute(
                "SELECT current_setting('max_connections')::int - count(*) FROM pg_stat_activity"
            ).fetchone()[0]
            if free < threads + 5:
                print(
                    f"PostgreSQL has {free} free connections; {threads} threads need {threads + 5}. "
                    "Run with fewer --threads, or when the other runs are done.",
                    file=sys.stderr,
                )
                raise SystemExit(2)
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}")
    except psycopg.OperationalError as error:
        print(f"PostgreSQL does not answer at {admin}: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _drop_database(database_url: str) -> None:
    import psycopg
    from django.db import connections

    connections.close_all()
    admin, name = _admin_url(database_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _setup_django(database_url: str) -> None:
    os.environ.update(
        DJANGO_SETTINGS_MODULE="billing_site.settings",
        DATABASE_URL=database_url,
        CELERY_TASK_ALWAYS_EAGER="1",
        EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
        LOG_LEVEL="ERROR",
        REDIS_URL="",
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def _world_figures() -> list[tuple[str, str]]:
    from accounts.models import BillingPeriod
    from invoices.models import Invoice, PaymentAttempt
    from usage.models import CreditPurchase, Job, LedgerEntry, UsageEvent

    jobs = Counter(Job.objects.values_list("status", flat=True))
    invoices = Counter(Invoice.objects.exclude(number=None).values_list("kind", "status"))
    purchases = Counter(CreditPurchase.objects.values_list("kind", "status"))
    attempts = Counter(PaymentAttempt.objects.values_list("status", flat=True))

    def listing(counter):
        return ", ".join(
            f"{' '.join(key) if isinstance(key, tuple) else key} {n:,}" for key, n in sorted(counter.items())
        )

    return [
        ("jobs", f"{sum(jobs.values()):,} ({listing(jobs)})"),
        ("usage events stored", f"{UsageEvent.objects.count():,}"),
        ("ledger entries", f"{LedgerEntry.objects.count():,}"),
        ("billing periods closed", f"{BillingPeriod.objects.exclude(closed_at=None).count():,}"),
        ("invoices numbered", f"{sum(invoices.values()):,} ({listing(invoices)})"),
        ("payment attempts", f"{sum(attempts.values()):,} ({listing(attempts)})"),
        ("credit purchases", f"{sum(purchases.values()):,} ({listing(purchases)})"),
    ]


def report(plan, report, found, intents) -> int:
    """Prints the figures; returns the number of anomalies."""
    print(
        f"\n{plan.threads} threads × {report.operations:,} operations in {report.seconds:.0f} s "
        f"({report.operations / max(report.seconds, 0.001):,.0f} operations/s), seed {plan.seed}\n"
    )
    width = max(len(kind) for kind in report.by_kind())
    print(f"{'operation':<{width}}  {'count':>6}  {'ok':>6}  refused (the product's answer)")
    for kind, outcomes in report.by_kind().items():
        refused = ", ".join(f"{code} {n}" for code, n in outcomes.most_common() if code != "ok")
        print(f"{kind:<{width}}  {sum(outcomes.values()):>6,}  {outcomes['ok']:>6,}  {refused}")
    print()
    statuses = Counter(pi.get("status") for pi in intents)
    figures = _world_figures() + [
        (
            "PaymentIntents at localstripe",
            f"{len(intents):,} ({', '.join(f'{s} {n}' for s, n in sorted(statuses.items()))})",
        ),
    ]
    for label, value in figures:
        print(f"{label:<31} {value}")
    print("\nchecks")
    total = 0
    checks = {
        **found,
        "operations without an unexpected error": report.errors,
        "nothing logged at ERROR by the product": report.logged_errors,
    }
    for check, problems in checks.items():
        total += len(problems)
        print(f"  {len(problems):>4}  {check}")
        for problem in problems[:10]:
            print(f"        {problem}")
    print(f"\nanomalies: {total}")
    return total


def main(argv=None) -> int:
    args, plan = _parse(argv)
    began = time.monotonic()
    _fresh_database(args.database_url, plan.threads)
    try:
        _setup_django(args.database_url)
        from django.conf import settings

        from invoices import pdf
        from soak import workload
        from tests.fake_stripe import localstripe_running
        from tests.invariants import anomalies, localstripe_payment_intents

        pdf.invoice_pdf_bytes = workload.pdf_stand_in
        with localstripe_running() as base:
            settings.STRIPE_API_BASE = base
            org_ids = workload.world_create()
            print(
                f"soak: {plan.threads} threads × {plan.operations:,} operations on {len(org_ids)} organisations, "
                f"{plan.months} months of billing time, database {args.database_url.rsplit('/', 1)[-1]}, "
                f"localstripe {base}",
                flush=True,
            )
            result = workload.run(
                plan, org_ids, progress=lambda done: print(f"  {done:,} operations done", flush=True)
            )
            workload.settle()
            intents = localstripe_payment_intents()
            found = anomalies(intents=intents, accepted_events=result.accepted_events)
            count = report(plan, result, found, intents)
    finally:
        if not args.keep:
            _drop_database(args.database_url)
    print(f"({time.monotonic() - began:.0f} s in all)")
    return 1 if count else 0


if __name__ == "__main__":
    sys.exit(main())

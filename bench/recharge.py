"""Threshold detection (issue 7): the jobs benchmark's hold + complete pairs (bench/jobs.py: same
client, clients and measured seconds) with a threshold auto-recharge on, against the same pairs with
auto-recharge off, on the same gunicorn and organisation, in alternating turns.

The threshold (1 credit) is far below the organisation's 1,000,000,000 credits, so the trigger in
usage/recharge_trigger.py runs on every hold and never fires. The setting is switched between turns
by the real services, usage.credits.recharge_setting_save (no card needed) and recharge_stop, in one
long-lived `manage.py shell` on the benchmark's database, so a switch costs milliseconds, not a
Django start-up. The turns go off, on, on, off, off, on, on, off: a steady drift (the tables grow)
falls on both alike.
"""

import subprocess
import sys
import time

import psycopg
import redis

from bench.client import Tally, percentile
from bench.jobs import CLIENTS, DURATION_SECONDS, WARMUP_SECONDS, Measure, _check_exact, drive, job_pair
from bench.report import Outcome, Row, rate
from bench.server import REDIS_URL, ROOT, Server, api_get, app_env, read_catalog, usage_by_product

THRESHOLD = 1  # credits
TURNS = 4  # per mode, DURATION_SECONDS over all of them
ORDER = ["off", "on", "on", "off"] * (TURNS // 2)
RATIO_TARGET = 0.90  # detection adds at most 10%
SWITCH_SECONDS = 60
CELERY_QUEUE = "celery"  # the default queue on the Redis broker (REDIS_URL)

# Runs in `manage.py shell -c`: one line "on" or "off" in, one line "BENCH-OK" or "BENCH-ERR …" out.
SWITCHER = """
import sys, traceback
from accounts.models import Organisation
from usage import credits
from usage.models import CreditPack
org = Organisation.objects.get(pk={org_id})
pack = CreditPack.objects.filter(active=True).order_by("price_cents", "pk").first()
while line := sys.stdin.readline():
    try:
        if line.strip() == "on":
            choice = credits.recharge_choice(kind="threshold", threshold={threshold}, pack_id=pack.pk)
            credits.recharge_setting_save(org=org, choice=choice, actor=None)
        else:
            credits.recharge_stop(org=org, actor=None)
        print("BENCH-OK", flush=True)
    except Exception:
        print("BENCH-ERR", repr(traceback.format_exc()), flush=True)
"""


class Switcher:
    """Turns the organisation's threshold auto-recharge on and off through usage/credits.py, and
    checks in the database that the ledger's copy (CreditAccount.recharge_below) followed."""

    def __init__(self, server: Server):
        self.server = server
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "shell",
                "-c",
                SWITCHER.format(org_id=server.org_id, threshold=THRESHOLD),
            ],
            cwd=ROOT,
            env=app_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def set(self, mode: str) -> None:
        self.proc.stdin.write(f"{mode}\n")
        self.proc.stdin.flush()
        seen = []
        deadline = time.monotonic() + SWITCH_SECONDS
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"recharge switcher exited ({self.proc.wait()}):\n" + "".join(seen[-25:]))
            if line.startswith("BENCH-OK"):
                break
            if line.startswith("BENCH-ERR"):
                raise RuntimeError(f"turning auto-recharge {mode} failed: {line}")
            seen.append(line)
        else:
            raise RuntimeError(f"turning auto-recharge {mode} took over {SWITCH_SECONDS} s")
        state = recharge_state(self.server)
        if mode == "on":
            right = state[:4] == (THRESHOLD, True, "threshold", THRESHOLD)
        else:  # no setting yet (enabled None), or one turned off
            right = state[0] is None and not state[1]
        if not right:
            raise RuntimeError(f"auto-recharge {mode}: (recharge_below, enabled, kind, threshold) is {state}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def recharge_state(server: Server) -> tuple:
    """(recharge_below, enabled, kind, threshold, failures, last_problem) of the organisation."""
    with psycopg.connect(server.database_url) as conn:
        return conn.execute(
            "SELECT a.recharge_below, s.enabled, s.kind, s.threshold, s.failures, s.last_problem "
            "FROM usage_creditaccount a LEFT JOIN usage_rechargesetting s ON s.org_id = a.org_id "
            "WHERE a.org_id = %s",
            [server.org_id],
        ).fetchone()


def _no_recharge_checks(server: Server) -> list[str]:
    """No purchase, no recharge task queued, no failed recharge recorded."""
    failures = []
    with psycopg.connect(server.database_url) as conn:
        purchases = conn.execute(
            "SELECT kind, status, count(*) FROM usage_creditpurchase WHERE org_id = %s GROUP BY 1, 2",
            [server.org_id],
        ).fetchall()
    if purchases:
        failures.append(f"recharge: the benchmark created purchases (kind, status, count): {purchases}")
    queued = redis.Redis.from_url(REDIS_URL).lrange(CELERY_QUEUE, 0, -1)
    recharges = [m for m in queued if b"recharge_threshold_run" in m]
    if recharges:
        failures.append(f"recharge: {len(recharges)} recharge task(s) queued on the Celery broker")
    state = recharge_state(server)
    if state[4] or state[5]:
        failures.append(f"recharge: a recharge was tried: failures {state[4]}, last problem {state[5]!r}")
    return failures


def _measure(tally: Tally) -> Measure:
    latencies = sorted(tally.latencies)
    return Measure(
        tally=tally,
        per_second=len(latencies) / DURATION_SECONDS,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
    )


def run(server: Server) -> Outcome:
    outcome = Outcome()
    per_page = read_catalog(server.database_url)[("parse", "base")]
    before = api_get(server, "/api/v1/balance"), usage_by_product(server)
    turn_seconds = DURATION_SECONDS / TURNS
    tallies = {"off": Tally(), "on": Tally()}
    turn_rates: dict[str, list[float]] = {"off": [], "on": []}
    switcher = Switcher(server)
    try:
        for mode in ("off", "on"):  # warm-up, not counted
            switcher.set(mode)
            tallies[mode].merge(drive(server, job_pair, WARMUP_SECONDS, 0))
        current = "on"
        for mode in ORDER:
            if mode != current:
                switcher.set(mode)
                current = mode
            tally = drive(server, job_pair, 0.5, turn_seconds)
            turn_rates[mode].append(len(tally.latencies) / turn_seconds)
            tallies[mode].merge(tally)
        switcher.set("off")
    finally:
        switcher.close()
    after = api_get(server, "/api/v1/balance"), usage_by_product(server)

    measures = {mode: _measure(tally) for mode, tally in tallies.items()}
    for mode, m in measures.items():
        if m.tally.failed:
            outcome.failures.append(
                f"recharge {mode}: {m.tally.failed} unexpected answers, e.g.\n  "
                + "\n  ".join(m.tally.examples)
            )
    completed = sum(m.tally.extra.get("completed", 0) for m in measures.values())
    outcome.failures += _check_exact(completed, per_page, before, after)
    outcome.failures += _no_recharge_checks(server)
    if after[0]["credits_remaining"] <= THRESHOLD:
        outcome.failures.append(f"recharge: the balance fell to {after[0]['credits_remaining']:,}")

    ours, ceiling = measures["on"], measures["off"]
    ratio = ours.per_second / ceiling.per_second if ceiling.per_second else 0.0
    for label, mode in (("threshold on", "on"), ("recharge off", "off")):
        m = measures[mode]
        turns = ", ".join(f"{r:,.0f}" for r in turn_rates[mode])
        print(
            f"jobs, {label}: {m.per_second:,.0f} requests/s, p50 {m.p50_ms:.1f} ms, p99 {m.p99_ms:.1f} ms "
            f"(turns: {turns}; {m.tally.extra.get('completed', 0):,} pairs completed)"
        )
    print(
        f"threshold {THRESHOLD} credit, balance {after[0]['credits_remaining']:,} after; {CLIENTS} clients, "
        f"{DURATION_SECONDS:.0f} s per mode in {TURNS} turns each; ratio {ratio:.3f}; "
        f"{completed:,} pairs charged exactly, no purchase, no recharge queued"
        if not outcome.failures
        else f"ratio {ratio:.3f}; checks failed"
    )
    outcome.rows.append(
        Row(
            "jobs with threshold detection (requests/s)",
            rate(ours.per_second),
            f"{rate(ceiling.per_second)} (auto-recharge off)",
            f"{ratio:.2f}",
            f">= {RATIO_TARGET:.2f}",
            ratio >= RATIO_TARGET,
        )
    )
    return outcome

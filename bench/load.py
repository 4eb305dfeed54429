"""`make load`: the metering API under a steady loopback load, with its rate limits in force.

Requests go out at a fixed rate (default 400 requests/s: the jobs path's rate in `make bench` on
this machine, 369–643 requests/s across runs, README "Performance"), whatever the answers, from
CLIENTS processes that take turns: POST jobs then POST jobs/{id}/complete, POST usage/events (10
events a batch; every tenth batch is sent again, so all of it must come back as duplicates) and
GET balance. They go to organisations on their plans' own limits:

- Pro organisations, each sent 80% of its 300 requests a minute: nothing should be refused;
- one Starter organisation sent twice its 120 a minute: 429s expected;
- one Free organisation with 2,000 credits sent nine times its 20 a minute, in jobs of 500 pages:
  429s expected within seconds, and 402s once its credits are spent.

A 429'd complete is retried later, as a client would; at the end every job still open is
completed, waiting out the rate-limit window if it must. Passes when every answer is one its
request may get (201/200/202, 402, 429), no job is left running, every ledger adds up, and each
organisation's credits used equal the credits the answers said were charged. Prints the answers by
status, p50/p99 latency, and the RSS of each gunicorn worker sampled from start to end.

    python -m bench.load [--seconds 300] [--rate 400]

`run(server, seconds)` is the same run against a bench.server.bench_server(), for other suites.
"""

import argparse
import itertools
import json
import math
import os
import random
import secrets
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import psycopg

from bench.client import Connection, HttpError, in_processes, percentile
from bench.server import Server, bench_server, manage, read_catalog

RATE = 400.0  # requests/s
CLIENTS = 8
BATCH = 10  # events a batch
RESEND_EVERY = 10  # every tenth batch is a resend of the one before
PRO_RPM, STARTER_RPM = 300, 120  # the plans' limits (DESIGN §2), which the shares below are cut to
PRO_SHARE = 0.8 * PRO_RPM / 60  # requests/s to each Pro organisation
STARTER_SHARE = 2 * STARTER_RPM / 60
FREE_SHARE = 3.0  # 180 a minute against its 20: 429s within seconds, even from a server behind
FREE_CREDITS = 2_000
FREE_JOB_PAGES = 500  # so four jobs spend its credits
JOB_PAGES = 10
DRAIN_SECONDS = 75  # a rate-limit window and then some, to complete the jobs left open
MAX_RSS_GROWTH = 0.10  # a worker's RSS from the first sample after warm-up to the last
EXPECTED = {
    "POST jobs": {201, 402, 429},
    "POST complete": {200, 429},
    "POST events": {202, 402, 429},
    "GET balance": {200, 429},
}
OPERATIONS = [("parse", "base"), ("extract", "base"), ("parse", "audio")]

CREATE_ORGS = """
import json
from accounts.services import organisation_create
for name, plan, credits in json.loads({specs!r}):
    org, key = organisation_create(
        name=name, plan_code=plan, owner_email=f"{{name}}@load.example.com", monthly_credits=credits
    )
    print("LOAD-ORG", json.dumps([org.pk, key]))
"""


@dataclass(frozen=True)
class Tenant:
    name: str
    plan: str
    share: float  # requests/s sent to it
    job_pages: int
    monthly_credits: int | None = None
    org_id: int = 0
    api_key: str = ""


def tenants_for(rate: float) -> list[Tenant]:
    run = secrets.token_hex(3)  # several runs may share one server
    steady = rate - STARTER_SHARE - FREE_SHARE
    pros = math.ceil(steady / PRO_SHARE)
    return [
        *(Tenant(f"load-{run}-pro-{i}", "pro", steady / pros, JOB_PAGES) for i in range(pros)),
        Tenant(f"load-{run}-starter", "starter", STARTER_SHARE, JOB_PAGES),
        Tenant(f"load-{run}-free", "free", FREE_SHARE, FREE_JOB_PAGES, FREE_CREDITS),
    ]


def create(tenants: list[Tenant]) -> list[Tenant]:
    """The organisations, through the same service as `create_org`, in one Django start-up."""
    specs = json.dumps([[t.name, t.plan, t.monthly_credits] for t in tenants])
    out = manage("shell", "-c", CREATE_ORGS.format(specs=specs))
    created = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("LOAD-ORG ")]
    if len(created) != len(tenants):
        raise RuntimeError(f"expected {len(tenants)} organisations, manage.py shell printed:\n{out}")
    return [replace(t, org_id=o, api_key=k) for t, (o, k) in zip(tenants, created, strict=True)]


# --- memory of the gunicorn workers ------------------------------------------------------------


def worker_rss(master_pid: int) -> dict[int, int]:
    """{pid: resident set size in kB} of the master's children (the workers)."""
    rss = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == master_pid:
                status = (stat.parent / "status").read_text()
                rss[int(stat.parent.name)] = int(status.split("VmRSS:")[1].split()[0])
        except (OSError, IndexError, ValueError):  # the process went away meanwhile
            continue
    return rss


# --- one client process ------------------------------------------------------------------------


@dataclass
class Seen:
    """What one client process sent and got."""

    statuses: Counter = field(default_factory=Counter)  # (request, status) -> count
    by_plan: Counter = field(default_factory=Counter)  # (plan, status) -> count
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    charged: Counter = field(default_factory=Counter)  # org id -> credits the answers said
    unexpected: list[str] = field(default_factory=list)
    late: float = 0.0  # the most a request went out after its turn, in seconds
    sent_for: float = 0.0  # seconds from the start to the end of the last request of the run
    rss: list[tuple[float, dict[int, int]]] = field(default_factory=list)
    drain: Counter = field(default_factory=Counter)

    def merge(self, other: "Seen") -> None:
        self.statuses += other.statuses
        self.by_plan += other.by_plan
        for k, v in other.latencies.items():
            self.latencies[k] += v
        self.charged += other.charged
        self.unexpected += other.unexpected[: 10 - len(self.unexpected)]
        self.late = max(self.late, other.late)
        self.sent_for = max(self.sent_for, other.sent_for)
        self.rss += other.rss
        self.drain += other.drain


class Client:
    def __init__(self, index: int, server: Server, tenants: list[Tenant], costs: dict, seconds: float):
        self.index, self.server, self.tenants, self.costs = index, server, tenants, costs
        self.seconds = seconds
        self.rng = random.Random(index)
        self.conns = {
            t.org_id: Connection(server.port, {"Authorization": f"Bearer {t.api_key}"}) for t in tenants
        }
        self.open_jobs: dict[int, list[str]] = defaultdict(list)  # org id -> jobs to complete
        self.last_batch: dict[int, bytes] = {}
        self.batches = itertools.count()
        self.seen = Seen()

    def send(self, tenant: Tenant, request: str, method: str, path: str, body: bytes = b"", drain=False):
        t0 = time.monotonic()
        try:
            status, answer = self.conns[tenant.org_id].request(method, path, body)
        except (OSError, HttpError) as e:
            self.conns[tenant.org_id].close()
            status, answer = 0, repr(e).encode()
        elapsed = time.monotonic() - t0
        if drain:
            self.seen.drain[(request, status)] += 1
        else:
            self.seen.statuses[(request, status)] += 1
            self.seen.by_plan[(tenant.plan, status)] += 1
            self.seen.latencies[request].append(elapsed)
        if status not in EXPECTED[request]:
            self.seen.unexpected.append(f"{tenant.plan} {method} {path}: {status} {answer[:300]!r}")
        try:
            return status, json.loads(answer)
        except ValueError:  # not JSON: already counted as unexpected, since every API answer is
            return status, {}

    def turn(self, tenant: Tenant) -> None:
        """One request to `tenant`: a job of its left open first, else a new job, events or the balance."""
        org = tenant.org_id
        if self.open_jobs[org]:
            self.complete(tenant, self.open_jobs[org][0])
            return
        choice = self.rng.random()
        if choice < 0.5:
            job = {"product": "parse", "mode": "base", "ocr": False, "pages": tenant.job_pages}
            body = json.dumps({**job, "file_type": "pdf", "file_size": 200_000}).encode()
            status, answer = self.send(tenant, "POST jobs", "POST", "/api/v1/jobs", body)
            if status == 201:
                self.open_jobs[org].append(answer["id"])
        elif choice < 0.75:
            self.events(tenant)
        else:
            self.send(tenant, "GET balance", "GET", "/api/v1/balance")

    def complete(self, tenant: Tenant, job_id: str, drain=False) -> int:
        path = f"/api/v1/jobs/{job_id}/complete"
        status, answer = self.send(tenant, "POST complete", "POST", path, b"{}", drain=drain)
        if status == 200:
            self.open_jobs[tenant.org_id].remove(job_id)
            self.seen.charged[tenant.org_id] += answer["credits_charged"]
        return status

    def events(self, tenant: Tenant) -> None:
        org = tenant.org_id
        number = next(self.batches)
        resend = org in self.last_batch and number % RESEND_EVERY == 0
        if resend:
            body, credits = self.last_batch.pop(org), 0
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            events = [
                {
                    "id": f"{tenant.name}-{self.index}-{number}-{i}",
                    "product": (op := self.rng.choice(OPERATIONS))[0],
                    "mode": op[1],
                    "units": self.rng.randint(1, 20),
                    "timestamp": stamp,
                }
                for i in range(BATCH)
            ]
            body = json.dumps({"events": events}).encode()
            credits = sum(e["units"] * self.costs[(e["product"], e["mode"])] for e in events)
        status, answer = self.send(tenant, "POST events", "POST", "/api/v1/usage/events", body)
        if status != 202:
            return
        wanted = {"accepted": 0, "duplicates": BATCH} if resend else {"accepted": BATCH, "duplicates": 0}
        if answer != wanted:
            self.seen.unexpected.append(f"{tenant.plan} events {'resent' if resend else 'new'}: {answer}")
        self.seen.charged[org] += credits
        if not resend:
            self.last_batch[org] = body

    def run(self, start: float, rate: float, sample_every: float) -> Seen:
        weights = [t.share for t in self.tenants]
        stop = start + self.seconds
        next_sample = start
        for n in itertools.count():
            due = start + (self.index + n * CLIENTS) / rate
            if due >= stop or time.monotonic() >= stop:  # a server that falls behind gets fewer
                break
            if self.index == 0 and time.monotonic() >= next_sample:  # one process samples memory
                self.seen.rss.append((time.monotonic() - start, worker_rss(self.server.pid)))
                next_sample += sample_every
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:
                self.seen.late = max(self.seen.late, -wait)
            self.turn(self.rng.choices(self.tenants, weights)[0])
        self.seen.sent_for = time.monotonic() - start
        if self.index == 0:
            self.seen.rss.append((self.seen.sent_for, worker_rss(self.server.pid)))
        self.drain_open_jobs()
        for conn in self.conns.values():
            conn.close()
        return self.seen

    def drain_open_jobs(self) -> None:
        """Completes every job still open, waiting for the rate limit where it says to."""
        deadline = time.monotonic() + DRAIN_SECONDS
        by_org = {t.org_id: t for t in self.tenants}
        while time.monotonic() < deadline and any(self.open_jobs.values()):
            for org, jobs in list(self.open_jobs.items()):
                for job_id in list(jobs):
                    if self.complete(by_org[org], job_id, drain=True) == 429:
                        time.sleep(1)
                        break
        left = sum(len(jobs) for jobs in self.open_jobs.values())
        if left:
            self.seen.unexpected.append(f"{left} jobs still open after {DRAIN_SECONDS} s of retries")


# --- the run -----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    seconds: float
    rate: float
    tenants: list[Tenant]
    seen: Seen
    load_before: float
    load_after: float
    failures: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.seen.statuses.values())

    @property
    def achieved(self) -> float:
        return self.requests / self.seen.sent_for if self.seen.sent_for else 0.0

    def p(self, q: float, request: str | None = None) -> float:
        if request is None:
            values = [v for vs in self.seen.latencies.values() for v in vs]
        else:
            values = self.seen.latencies.get(request, [])
        return percentile(sorted(values), q) * 1000

    def report(self) -> str:
        by_status = Counter()
        for (_, status), count in self.seen.statuses.items():
            by_status[status] += count
        pros = [t for t in self.tenants if t.plan == "pro"]
        lines = [
            f"load: {self.seconds:.0f} s at {self.rate:g} requests/s from {CLIENTS} processes: "
            f"{self.requests:,} requests in {self.seen.sent_for:.1f} s = {self.achieved:.1f}/s "
            + (
                "(the server kept up)"
                if self.seen.late < 1
                else f"(the server fell behind: a request went out up to {self.seen.late:.1f} s after its turn)"
            ),
            f"  organisations: {len(pros)} Pro at {pros[0].share:.2f} requests/s each "
            f"({pros[0].share * 60 / PRO_RPM:.0%} of {PRO_RPM} a minute), 1 Starter at "
            f"{STARTER_SHARE:g}/s (twice its {STARTER_RPM}), 1 Free with {FREE_CREDITS:,} credits at {FREE_SHARE:g}/s "
            "(nine times its 20)",
            "  answers: " + ", ".join(f"{s}: {n:,}" for s, n in sorted(by_status.items())),
        ]
        for request in EXPECTED:
            counts = {s: n for (r, s), n in self.seen.statuses.items() if r == request}
            lines.append(
                f"    {request:<13} "
                + ", ".join(f"{s}: {n:,}" for s, n in sorted(counts.items()))
                + f"; p50 {self.p(0.5, request):.0f} ms, p99 {self.p(0.99, request):.0f} ms"
            )
        for plan in ("pro", "starter", "free"):
            counts = {s: n for (p, s), n in self.seen.by_plan.items() if p == plan}
            lines.append(
                f"    {plan + ' organisations':<21} "
                + ", ".join(f"{s}: {n:,}" for s, n in sorted(counts.items()))
            )
        lines.append(f"  latency, all answers: p50 {self.p(0.5):.0f} ms, p99 {self.p(0.99):.0f} ms")
        if self.seen.drain:
            drained = ", ".join(f"{s}: {n}" for (_, s), n in sorted(self.seen.drain.items()))
            lines.append(f"  jobs left open, completed after the run: {drained}")
        lines += self._rss_lines()
        lines.append(
            f"  load average (1 min) {self.load_before:.1f} before, {self.load_after:.1f} after, "
            f"on {os.cpu_count()} cores"
        )
        lines.append("  failures: " + ("none" if not self.failures else f"{len(self.failures)}"))
        return "\n".join(lines)

    def _rss_lines(self) -> list[str]:
        samples = sorted(self.seen.rss)
        if not samples:
            return ["  gunicorn workers: no memory samples"]
        first, last = _after_warmup(samples), samples[-1]
        lines = [
            f"  gunicorn worker RSS, MB (at {first[0]:.0f} s -> {last[0]:.0f} s): "
            + ", ".join(
                f"pid {pid} {kb / 1024:.1f} -> {last[1].get(pid, 0) / 1024:.1f}"
                for pid, kb in sorted(first[1].items())
            )
        ]
        series = " | ".join(
            f"{t:.0f} s: " + " ".join(f"{kb / 1024:.1f}" for _, kb in sorted(rss.items()))
            for t, rss in samples
        )
        lines.append(f"    samples: {series}")
        return lines


def _after_warmup(samples):
    """The first sample taken after a tenth of the run (imports and caches settle in the first
    requests), or the first one."""
    end = samples[-1][0]
    return next((s for s in samples if s[0] >= end / 10), samples[0])


def _check_memory(result: LoadResult) -> list[str]:
    samples = sorted(result.seen.rss)
    if len(samples) < 2:
        return ["memory: fewer than two samples of the gunicorn workers"]
    (_, first), (_, last) = _after_warmup(samples), samples[-1]
    problems = []
    if set(first) != set(last):
        problems.append(
            f"memory: the gunicorn workers changed during the run: {sorted(first)} -> {sorted(last)}"
        )
    for pid in set(first) & set(last):
        if last[pid] > first[pid] * (1 + MAX_RSS_GROWTH):
            problems.append(
                f"memory: worker {pid} grew from {first[pid] / 1024:.1f} MB to {last[pid] / 1024:.1f} MB "
                f"(more than {MAX_RSS_GROWTH:.0%})"
            )
    return problems


def _check_books(server: Server, tenants: list[Tenant], charged: Counter) -> list[str]:
    """No job left running, every ledger adds up, and credits used = what the answers charged."""
    ids = [t.org_id for t in tenants]
    with psycopg.connect(server.database_url) as conn:
        rows = conn.execute(
            """
            SELECT a.org_id, a.balance, a.running_jobs, a.overage_held,
                   (SELECT COALESCE(SUM(remaining), 0) FROM usage_creditlot l WHERE l.org_id = a.org_id),
                   (SELECT COALESCE(SUM(credits), 0) FROM usage_ledgerentry e
                     WHERE e.org_id = a.org_id AND e.lot_id IS NOT NULL),
                   (SELECT COUNT(*) FROM usage_job j WHERE j.org_id = a.org_id AND j.status = 'running'),
                   (SELECT COALESCE(SUM(credits_used), 0) FROM accounts_billingperiod p WHERE p.org_id = a.org_id)
            FROM usage_creditaccount a WHERE a.org_id = ANY(%s)
            """,
            [ids],
        ).fetchall()
    problems = []
    for org, balance, running, overage_held, lots, entries, jobs_running, used in rows:
        if not balance == lots == entries:
            problems.append(f"org {org}: balance {balance}, lots {lots}, ledger {entries} differ")
        if running or jobs_running or overage_held:
            problems.append(
                f"org {org}: {jobs_running} jobs running ({running} counted), {overage_held} held"
            )
        if used != charged[org]:
            problems.append(f"org {org}: {used:,} credits used, the answers charged {charged[org]:,}")
    if len(rows) != len(ids):
        problems.append(f"found {len(rows)} of {len(ids)} organisations' accounts")
    return problems


def run(server: Server, seconds: float, rate: float = RATE) -> LoadResult:
    """Runs the load for `seconds` against a bench_server(); the result says what was seen and
    lists any failure (its `report()` prints the figures)."""
    tenants = create(tenants_for(rate))
    costs = read_catalog(server.database_url)
    load_before = os.getloadavg()[0]
    start = time.monotonic() + 0.5
    sample_every = max(2.0, seconds / 20)

    def client(index: int) -> Seen:
        return Client(index, server, tenants, costs, seconds).run(start, rate, sample_every)

    seen = Seen()
    for one in in_processes(client, CLIENTS, timeout=seconds + DRAIN_SECONDS + 60):
        seen.merge(one)
    result = LoadResult(seconds, rate, tenants, seen, load_before, os.getloadavg()[0])
    if seen.unexpected:
        result.failures.append("unexpected answers, e.g.\n  " + "\n  ".join(seen.unexpected))
    result.failures += _check_memory(result)
    result.failures += _check_books(server, tenants, seen.charged)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300, help="how long to send (default 300)")
    parser.add_argument("--rate", type=float, default=RATE, help=f"requests/s (default {RATE:g})")
    args = parser.parse_args(argv)
    floor = STARTER_SHARE + FREE_SHARE + 1
    if args.seconds < 5 or args.rate < floor:
        parser.error(f"--seconds must be at least 5 and --rate at least {floor:g}")
    with bench_server() as server:
        result = run(server, args.seconds, args.rate)
    print(result.report())
    if result.failures:
        print("\nFAILED:", *result.failures, sep="\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Crash and re-run (DESIGN §6: "a crash half-way and a re-run leave the same state as one clean
run"). The scenario of tests/reliability/scenario.py runs once cleanly; then, for each injection
point, it runs again with the worker dying there: at every step boundary of billing_tick, inside a
period close, while an invoice takes its number, before and after the Stripe call of a payment and
before its write, in webhook processing and in auto-recharge. Whatever was running is re-run ten
minutes later (the same task, then billing_tick; or billing_tick), the scenario carries on, and the
final state (tests/reliability/snapshot.py) must equal the clean run's, with every invariant of
tests/invariants.py holding.

The worker's death is an exception nothing catches (RequestDied, a BaseException), raised once, at
the first call that matches; a few points raise an ordinary exception where the product is meant
to catch it (a webhook that fails is stored as failed and retried). Each test checks its point was
reached, so none passes by missing it.

These run in the PostgreSQL pass only (real transactions; localstripe), once, for time.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from email import policy as email_policy
from email.parser import BytesParser
from importlib import import_module
from pathlib import Path
from urllib.parse import quote

import pytest
from django.conf import settings
from django.core import mail
from django.core.management import call_command
from django.utils import timezone

from accounts import clock
from invoices import pdf
from invoices.models import Invoice
from soak.workload import pdf_stand_in
from tests.catalog import catalog_seed
from tests.fake_stripe import localstripe_running
from tests.invariants import anomalies, localstripe_payment_intents
from tests.reliability import scenario, snapshot
from tests.reliability.scenario import STEPS, RequestDied
from usage.selectors import catalog_forget

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

LATER = timedelta(minutes=10)  # when the re-run happens, on the wall clock


class InjectedError(Exception):
    """An ordinary exception, for the places where the product is meant to catch one."""


def _invoice_of(kwargs) -> Invoice:
    return Invoice.objects.get(pk=int(kwargs["metadata"]["invoice_id"]))


def _charging(kind: str, fulfilled: str | None = None) -> Callable:
    """Matches a Stripe charge of an invoice of `kind` (and, for purchases, of which kind)."""

    def match(*args, **kwargs):
        invoice = _invoice_of(kwargs)
        return invoice.kind == kind and (fulfilled is None or invoice.fulfilment.get("kind") == fulfilled)

    return match


@dataclass(frozen=True)
class Crash:
    """Where the worker dies: `target` ("module:function"), before or after the real call, at the
    first call that `only` accepts, from step `from_step` on."""

    name: str
    target: str
    when: str = "after"
    only: Callable | None = None
    from_step: int = 0
    error: type[BaseException] = RequestDied


def _tick_step(name: str) -> str:
    return f"billing_site.tick:{name}"


CRASHES = [
    # billing_tick's steps, each one dying right after its work committed (the next never starts)
    Crash("tick: before anything", _tick_step("jobs_fail_stale"), "before", from_step=3),
    *(
        Crash(f"tick: after {step}", _tick_step(step), from_step=3)
        for step in (
            "jobs_fail_stale",
            "downgrades_apply_due",
            "periods_roll_due",
            "commitment_periods_close",
            "webhook_events_process_pending",
            "payment_attempts_reconcile",
            "period_invoices_collect",
            "purchases_settle_stale",
            "recharges_run_due",
            "low_balance_alerts_run",
        )
    ),
    # inside a period close
    Crash("period close: a stale job's hold released", "usage.services:job_fail"),
    Crash("period close: plan credits expired", "usage.services:lots_expire"),
    Crash("period close: the next period opened", "accounts.services:period_open", from_step=1),
    Crash("period close: the invoice numbers reserved", "invoices.services:_numbers_reserve", from_step=1),
    Crash("period close: the invoices issued", "invoices.services:invoices_issue_bulk", from_step=1),
    Crash("period close: bonus credits expired", "usage.credits:lots_expire"),
    # invoice issue: the number is taken, then the worker dies in the same transaction
    Crash("invoice issue: a period invoice numbered", "invoices.services:_number_next", from_step=3),
    Crash(
        "invoice issue: a paid purchase numbered",
        "invoices.services:_issue_locked",
        only=lambda invoice, now: invoice.kind == "purchase",
    ),
    # payments
    Crash(
        "period invoice: before the Stripe call",
        "invoices.stripe_gateway:payment_intent_create_off_session",
        "before",
        only=_charging("period"),
    ),
    Crash(
        "period invoice: after the Stripe call, before our write",
        "invoices.stripe_gateway:payment_intent_create_off_session",
        only=_charging("period"),
    ),
    Crash("period invoice: paid, written, before the tick moves on", "invoices.services:invoice_charge"),
    Crash(
        "period invoice: declined, its retry not yet scheduled",
        "invoices.period_billing:_dunning",
        "before",
    ),
    # webhooks
    Crash(
        "webhook: marked processing, the worker dies", "invoices.services:_webhook_payment_settle", "before"
    ),
    Crash(
        "webhook: settling it raises",
        "invoices.services:_attempt_reconcile",
        "before",
        error=InjectedError,
    ),
    Crash("webhook: settled, before it is marked processed", "invoices.services:_webhook_payment_settle"),
    # auto-recharge
    Crash(
        "threshold recharge: reserved, before paying", "usage.credits:_purchase_pay", "before", from_step=1
    ),
    Crash("recharge task: reserved, before paying", "usage.credits:_purchase_pay", "before", from_step=2),
    Crash(
        "threshold recharge: before the Stripe call",
        "invoices.stripe_gateway:payment_intent_create_off_session",
        "before",
        only=_charging("purchase", "threshold"),
    ),
    Crash(
        "threshold recharge: after the Stripe call, before our write",
        "invoices.stripe_gateway:payment_intent_create_off_session",
        only=_charging("purchase", "threshold"),
    ),
    Crash(
        "threshold recharge: paid at Stripe, its credits not yet granted",
        "usage.credits:purchase_fulfil",
        "before",
    ),
    Crash(
        "scheduled recharge: after the Stripe call, before our write",
        "invoices.stripe_gateway:payment_intent_create_off_session",
        only=_charging("purchase", "schedule"),
    ),
    Crash("recharge: paid, before the purchase is settled", "usage.credits:_purchase_settle", from_step=1),
]


class Injected:
    """Installs a Crash with monkeypatch; it fires once, while armed."""

    def __init__(self, crash: Crash, monkeypatch):
        self.crash, self.armed, self.fired = crash, False, False
        module_name, name = crash.target.split(":")
        module = import_module(module_name)
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            if not self.armed or self.fired:
                return real(*args, **kwargs)
            if crash.only is not None and not crash.only(*args, **kwargs):
                return real(*args, **kwargs)
            if crash.when == "after":
                real(*args, **kwargs)
            self.fired = True
            raise crash.error(f"injected: {crash.name}")

        monkeypatch.setattr(module, name, wrapper)


def _later(monkeypatch, by: timedelta) -> None:
    """From now on the wall clock reads `by` later (billing time with it, unless --at pins it)."""
    real = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real() + by)
    clock.forget()


@dataclass(frozen=True)
class Kill:
    """A worker process running step `step` is killed with SIGKILL once it reaches `target`
    (after calling it, when `when` is "after")."""

    name: str
    step: int
    target: str
    when: str = "after"


KILLS = [
    Kill("billing_tick killed while closing a period", 3, "usage.services:lots_expire"),
    Kill("billing_tick killed holding the year's invoice number", 3, "invoices.services:_number_next"),
    Kill(
        "billing_tick killed after Stripe answered, before our write",
        3,
        "invoices.stripe_gateway:payment_intent_create_off_session",
    ),
    Kill(
        "recharge task killed after Stripe charged, before our write",
        2,
        "invoices.stripe_gateway:payment_intent_create_off_session",
    ),
]

# The worker: Django set up on the test database, its e-mails written to files in a folder (what it
# sent before it died was really sent), `target` made to announce itself and wait to be killed, then
# the step's code.
WORKER = """
import importlib, sys, time
import django
django.setup()
from django.conf import settings
settings.EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
settings.EMAIL_FILE_PATH = sys.argv[4]
module_name, name = sys.argv[1].split(":")
module = importlib.import_module(module_name)
real = getattr(module, name)
def reached(*args, **kwargs):
    if sys.argv[2] == "after":
        real(*args, **kwargs)
    print("REACHED", flush=True)
    time.sleep(600)
setattr(module, name, reached)
exec(sys.argv[3])
print("FINISHED WITHOUT REACHING IT", flush=True)
"""


def _worker_env() -> dict[str, str]:
    db = settings.DATABASES["default"]
    password = f":{quote(db['PASSWORD'])}" if db.get("PASSWORD") else ""
    url = f"postgres://{quote(db['USER'])}{password}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "billing_site.settings",
        "DATABASE_URL": url,
        "STRIPE_API_BASE": settings.STRIPE_API_BASE,
    }


@dataclass(frozen=True)
class SentMail:
    """What tests/reliability/snapshot.py reads of an e-mail."""

    subject: str
    to: list[str]


def _mails_sent_by_worker(folder: Path) -> list[SentMail]:
    """The e-mails the killed worker sent, from the files of Django's filebased backend (one file
    per connection, messages separated by a line of 79 dashes)."""
    sent = []
    for path in sorted(folder.iterdir()):
        for chunk in path.read_bytes().split(b"-" * 79):
            if chunk.strip():
                message = BytesParser(policy=email_policy.default).parsebytes(chunk.strip() + b"\n")
                sent.append(
                    SentMail(str(message["Subject"]), [a.strip() for a in str(message["To"]).split(",")])
                )
    return sent


def _run_and_kill(world, step, kill: Kill) -> None:
    """Runs the step in a worker process of its own and kills it with SIGKILL at `kill.target`; the
    e-mails it sent before dying join the test's outbox."""
    mail_folder = Path(tempfile.mkdtemp(prefix="killed-worker-mail-"))
    worker = subprocess.Popen(  # noqa: S603 - our interpreter, our code
        [sys.executable, "-c", WORKER, kill.target, kill.when, step.script(world), str(mail_folder)],
        cwd=settings.BASE_DIR,
        env=_worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    timer = threading.Timer(180, worker.kill)  # it never got there: fail rather than hang
    timer.start()
    try:
        line = worker.stdout.readline()
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(30)
    finally:
        timer.cancel()
    assert line.strip() == "REACHED", (
        f"the worker never reached {kill.target}: {line!r} {worker.stderr.read()[-2000:]}"
    )
    mail.outbox.extend(_mails_sent_by_worker(mail_folder))
    shutil.rmtree(mail_folder)


def run(monkeypatch, crash: Crash | None = None, kill: Kill | None = None) -> tuple[dict, str | None]:
    """Makes the world, runs the steps (crashing once, and re-running what crashed, if `crash` or
    `kill`), and returns the final state and the step that crashed."""
    world = scenario.world_create()
    injected = Injected(crash, monkeypatch) if crash else None
    crashed_in = None
    for index, step in enumerate(STEPS):
        if kill is not None and index == kill.step:
            _run_and_kill(world, step, kill)
            crashed_in = step.name
            _later(monkeypatch, LATER)
            step.rerun(world)
            if step.then is not None:
                step.then(world)
            continue
        if injected and not injected.fired:
            injected.armed = index >= crash.from_step
        with contextlib.suppress(RequestDied, InjectedError):  # the worker died: nothing more of it runs
            step.run(world)
        if injected and injected.fired and crashed_in is None:
            injected.armed = False
            crashed_in = step.name
            _later(monkeypatch, LATER)
            step.rerun(world)
        if step.then is not None:
            step.then(world)
    intents = localstripe_payment_intents()
    found = {check: problems for check, problems in anomalies(intents=intents).items() if problems}
    assert found == {}, found
    return snapshot.state(world.orgs, intents), crashed_in


def _fresh_world() -> None:
    """An empty database with the seeded catalog, as a new transactional test starts."""
    call_command("flush", interactive=False, verbosity=0)
    catalog_seed()
    mail.outbox.clear()
    clock.forget()
    catalog_forget()


_clean: dict[str, dict] = {}


def clean_state(monkeypatch) -> dict:
    """The clean run's final state (made once per session, in whichever test needs it first)."""
    if "state" not in _clean:
        with monkeypatch.context() as scoped:
            _clean["state"], _ = run(scoped)
        _fresh_world()
    return _clean["state"]


@pytest.fixture(scope="module")
def own_localstripe():
    """A localstripe for this module alone: each run lists every PaymentIntent the server holds,
    so the session's (with every other test's) would make that slower and slower."""
    with localstripe_running() as base:
        before, settings.STRIPE_API_BASE = settings.STRIPE_API_BASE, base
        yield base
        settings.STRIPE_API_BASE = before


def _assert_same(clean: dict, state: dict, crashed_in: str) -> None:
    differences = {}
    for part, clean_part in clean.items():
        pairs = clean_part.items() if isinstance(clean_part, dict) else [(None, clean_part)]
        for key, clean_value in pairs:
            value = state[part] if key is None else state[part][key]
            if value != clean_value:
                differences[part if key is None else f"{part} / {key}"] = (clean_value, value)
    assert differences == {}, f"after a crash in {crashed_in}, (clean run, crashed run): {differences}"


@pytest.mark.parametrize("crash", CRASHES, ids=[c.name for c in CRASHES])
def test_a_crash_and_a_rerun_leave_the_state_of_one_clean_run(crash, own_localstripe, monkeypatch):
    monkeypatch.setattr(pdf, "invoice_pdf_bytes", pdf_stand_in)  # WeasyPrint's seconds add up here
    clean = clean_state(monkeypatch)
    state, crashed_in = run(monkeypatch, crash)
    assert crashed_in is not None, f"the scenario never reached {crash.target}"
    _assert_same(clean, state, crashed_in)


@pytest.mark.parametrize("kill", KILLS, ids=[k.name for k in KILLS])
def test_a_killed_worker_and_a_rerun_leave_the_state_of_one_clean_run(kill, own_localstripe, monkeypatch):
    monkeypatch.setattr(pdf, "invoice_pdf_bytes", pdf_stand_in)
    clean = clean_state(monkeypatch)
    state, crashed_in = run(monkeypatch, kill=kill)
    _assert_same(clean, state, crashed_in)

"""The threshold auto-recharge's trigger, called by the ledger's charging paths (usage/services.py).

It costs no query: the caller passes the balance before and after its change and the account's
`recharge_below`, a copy of the enabled threshold kept by usage/credits.py, all as read under the
organisation's lock. When a charge takes the balance from at or above the threshold to below it, a
Celery task is queued once the transaction commits (at once when the charge has committed
already); the recharge itself (and its card payment) never runs inside the API request. A crossing
that no task handles (a lost message, a worker down) is caught by billing_tick, which recharges
every organisation still below its threshold.
"""

import logging
from functools import partial

from django.db import transaction

log = logging.getLogger(__name__)


def recharge_threshold_crossed(*, org_id: int, below: int | None, before: int, after: int) -> None:
    """Queues the recharge check, after commit, if a change of the organisation's balance from
    `before` to `after` takes it below its enabled threshold `below` (CreditAccount.recharge_below,
    as read under the lock)."""
    if below is None or not before >= below > after:
        return
    transaction.on_commit(partial(recharge_queue, org_id), robust=True)


def recharge_queue(org_id: int) -> None:
    from usage.tasks import recharge_threshold_run

    recharge_threshold_run.delay(org_id)

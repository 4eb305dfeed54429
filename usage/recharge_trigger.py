"""The threshold auto-recharge's trigger, called by the ledger's charging paths (usage/services.py).

It runs under the organisation's lock, on the CreditAccount row the caller already holds, and costs
no query: `recharge_below` is a copy of the enabled threshold kept by usage/credits.py. When a
charge takes the balance from at or above the threshold to below it, a Celery task is queued once
the transaction commits; the recharge itself (and its card payment) never runs inside the API
request. A crossing that no task handles (a lost message, a worker down) is caught by billing_tick,
which recharges every organisation still below its threshold.
"""

import logging
from functools import partial

from django.db import transaction

log = logging.getLogger(__name__)


def recharge_threshold_crossed(account, balance_after: int) -> None:
    """Queues the recharge check, after commit, if this change of `account` (locked, as read before
    the change) takes its balance below an enabled threshold."""
    below = account.recharge_below
    if below is None or not account.balance >= below > balance_after:
        return
    transaction.on_commit(partial(recharge_queue, account.org_id), robust=True)


def recharge_queue(org_id: int) -> None:
    from usage.tasks import recharge_threshold_run

    recharge_threshold_run.delay(org_id)

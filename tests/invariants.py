"""The ledger's invariants, checked after every kind of test that moves credits."""

from django.db.models import Sum

from usage.models import CreditAccount, CreditLot, Job, JobStatus, LedgerEntry


def assert_ledger_consistent(org_id: int) -> None:
    account = CreditAccount.objects.get(org_id=org_id)
    lots = CreditLot.objects.filter(org_id=org_id)
    lot_sum = lots.aggregate(s=Sum("remaining"))["s"] or 0
    entry_sum = (
        LedgerEntry.objects.filter(org_id=org_id, lot__isnull=False).aggregate(s=Sum("credits"))["s"] or 0
    )
    assert account.balance == lot_sum == entry_sum, (account.balance, lot_sum, entry_sum)
    for lot in lots:
        from_entries = lot.entries.aggregate(s=Sum("credits"))["s"] or 0
        assert lot.remaining == from_entries, (lot, from_entries)
        assert 0 <= lot.remaining <= lot.granted
    running = Job.objects.filter(org_id=org_id, status=JobStatus.RUNNING)
    assert account.running_jobs == running.count()
    assert account.overage_held == (running.aggregate(s=Sum("held_overage"))["s"] or 0)
    assert not Job.objects.filter(org_id=org_id, status=JobStatus.FAILED, credits_charged__gt=0).exists()

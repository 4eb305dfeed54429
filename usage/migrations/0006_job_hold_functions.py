"""On PostgreSQL, a job's hold and its end (complete or fail) as two PL/pgSQL functions, so that the
API's hottest writes are one statement each instead of eight (usage/services.py calls them; on
SQLite the same rules run as statements from Python, in services.py beside the calls).

The rules are those of DESIGN §3 and of the Python path: the organisation's CreditAccount row is
locked first; lots are spent in bucket order, soonest expiry first, oldest first; every change of
a lot is a ledger entry; the account's cached totals change in the same transaction.

`usage_job_start(job, concurrent_jobs, overage_rate, overage_cap_cents)` takes the new job as a
usage_job row (made by Python with json_populate_record, so a new column needs no change here) and
answers (outcome, held_from_lots, held_overage, balance_before, recharge_below); outcome is one of
started, replayed, conflict (an Idempotency-Key used with another body), busy (concurrent-job
limit), no_credits (no overage on this plan), over_cap (the overage cap) or unknown_org. Nothing is
written unless it is started.

`usage_job_end(org_id, job_id, status, pages, now, day)` moves a running job to `status` at `now`
(succeeded: charging min(pages, its pages) pages, as usage of `day`; failed: nothing) and answers the job
row as it is afterwards; a job that had already ended comes back unchanged, and no row means no
such job of that organisation.
"""

from django.db import migrations

CREATE = r"""
CREATE OR REPLACE FUNCTION usage_job_start(
    p_job usage_job, p_concurrent_jobs integer, p_overage_rate numeric, p_overage_cap_cents bigint,
    OUT outcome text, OUT held_from_lots bigint, OUT held_overage bigint,
    OUT balance_before bigint, OUT recharge_below bigint
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    account usage_creditaccount%ROWTYPE;
    lot record;
    left_to_take bigint;
    n bigint;
BEGIN
    SELECT * INTO account FROM usage_creditaccount WHERE org_id = p_job.org_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'unknown_org';
        RETURN;
    END IF;
    balance_before := account.balance;
    recharge_below := account.recharge_below;
    IF p_job.idempotency_key IS NOT NULL THEN
        SELECT CASE WHEN j.request_hash = p_job.request_hash THEN 'replayed' ELSE 'conflict' END
            INTO outcome
            FROM usage_job j WHERE j.org_id = p_job.org_id AND j.idempotency_key = p_job.idempotency_key;
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    IF account.running_jobs >= p_concurrent_jobs THEN
        outcome := 'busy';
        RETURN;
    END IF;
    held_from_lots := LEAST(p_job.credits_reserved, account.balance);
    held_overage := p_job.credits_reserved - held_from_lots;
    IF held_overage > 0 THEN
        IF p_overage_rate IS NULL THEN
            outcome := 'no_credits';
            RETURN;
        END IF;
        -- the cap counts this period's charged overage, open holds' overage and this one, in cents
        IF p_overage_cap_cents IS NOT NULL AND (
            (SELECT p.overage_credits FROM accounts_billingperiod p
                JOIN accounts_subscription s ON s.current_period_id = p.id WHERE s.org_id = p_job.org_id)
            + account.overage_held + held_overage
        ) * p_overage_rate / 10 > p_overage_cap_cents THEN
            outcome := 'over_cap';
            RETURN;
        END IF;
    END IF;

    p_job.held_from_lots := held_from_lots;
    p_job.held_overage := held_overage;
    INSERT INTO usage_job SELECT (p_job).*;
    left_to_take := held_from_lots;
    IF left_to_take > 0 THEN
        FOR lot IN
            SELECT id, remaining FROM usage_creditlot WHERE org_id = p_job.org_id AND remaining > 0
            ORDER BY bucket, expires_at ASC NULLS LAST, id
        LOOP
            n := LEAST(lot.remaining, left_to_take);
            UPDATE usage_creditlot SET remaining = remaining - n WHERE id = lot.id;
            INSERT INTO usage_ledgerentry
                (org_id, lot_id, kind, credits, job_id, period_id, reason, created_by_id, created_at)
                VALUES (p_job.org_id, lot.id, 'hold', -n, p_job.id, NULL, '', NULL, p_job.created_at);
            left_to_take := left_to_take - n;
            EXIT WHEN left_to_take = 0;
        END LOOP;
        IF left_to_take > 0 THEN  -- the cached balance and the lots disagree: refuse rather than overspend
            RAISE EXCEPTION 'Credit lots of organisation % do not cover its balance', p_job.org_id;
        END IF;
    END IF;
    UPDATE usage_creditaccount
        SET balance = balance - held_from_lots, overage_held = overage_held + held_overage,
            running_jobs = running_jobs + 1
        WHERE org_id = p_job.org_id;
    outcome := 'started';
END
$$;

CREATE OR REPLACE FUNCTION usage_job_end(
    p_org_id bigint, p_job_id uuid, p_status text, p_pages integer, p_now timestamptz, p_day date
) RETURNS SETOF usage_job LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    job usage_job%ROWTYPE;
    from_lots bigint;
    overage bigint;
    left_to_release bigint;
    released bigint := 0;
    n bigint;
    hold record;
    period bigint;
BEGIN
    PERFORM 1 FROM usage_creditaccount WHERE org_id = p_org_id FOR UPDATE;
    IF p_status = 'succeeded' THEN
        UPDATE usage_job SET status = 'succeeded', finished_at = p_now,
                pages_charged = LEAST(pages, p_pages),
                credits_charged = LEAST(pages, p_pages) * (credits_per_page + ocr_credits_per_page)
            WHERE org_id = p_org_id AND id = p_job_id AND status = 'running'
            RETURNING * INTO job;
    ELSE
        UPDATE usage_job SET status = 'failed', finished_at = p_now
            WHERE org_id = p_org_id AND id = p_job_id AND status = 'running'
            RETURNING * INTO job;
    END IF;
    IF NOT FOUND THEN  -- not running: the job as it is, if it is the organisation's
        RETURN QUERY SELECT * FROM usage_job WHERE org_id = p_org_id AND id = p_job_id;
        RETURN;
    END IF;

    -- what was held beyond the charge goes back to the lots it came from, most recently taken first
    from_lots := LEAST(job.credits_charged, job.held_from_lots);
    overage := job.credits_charged - from_lots;
    left_to_release := job.held_from_lots - from_lots;
    IF left_to_release > 0 THEN
        FOR hold IN
            SELECT e.lot_id, -e.credits AS held, l.expired_at IS NULL AS live
            FROM usage_ledgerentry e JOIN usage_creditlot l ON l.id = e.lot_id
            WHERE e.job_id = p_job_id AND e.kind = 'hold' ORDER BY e.id DESC
        LOOP
            n := LEAST(hold.held, left_to_release);
            INSERT INTO usage_ledgerentry
                (org_id, lot_id, kind, credits, job_id, period_id, reason, created_by_id, created_at)
                VALUES (p_org_id, hold.lot_id, 'release', n, p_job_id, NULL, '', NULL, job.finished_at);
            IF hold.live THEN
                UPDATE usage_creditlot SET remaining = remaining + n WHERE id = hold.lot_id;
                released := released + n;
            ELSE  -- a lot that expired meanwhile gets them back and loses them again at once
                INSERT INTO usage_ledgerentry
                    (org_id, lot_id, kind, credits, job_id, period_id, reason, created_by_id, created_at)
                    VALUES (p_org_id, hold.lot_id, 'expire', -n, p_job_id, NULL, 'lot expired while held',
                            NULL, job.finished_at);
            END IF;
            left_to_release := left_to_release - n;
            EXIT WHEN left_to_release = 0;
        END LOOP;
    END IF;
    UPDATE usage_creditaccount
        SET balance = balance + released, overage_held = overage_held - job.held_overage,
            running_jobs = running_jobs - 1
        WHERE org_id = p_org_id;

    IF job.status = 'succeeded' THEN
        UPDATE accounts_billingperiod
            SET credits_used = credits_used + job.credits_charged, overage_credits = overage_credits + overage
            WHERE id = (SELECT current_period_id FROM accounts_subscription WHERE org_id = p_org_id)
            RETURNING id INTO period;
        IF overage > 0 THEN
            INSERT INTO usage_ledgerentry
                (org_id, lot_id, kind, credits, job_id, period_id, reason, created_by_id, created_at)
                VALUES (p_org_id, NULL, 'overage', -overage, p_job_id, period, '', NULL, job.finished_at);
        END IF;
        INSERT INTO usage_usagerollup (org_id, day, product, mode, credits, units)
            SELECT p_org_id, p_day, job.product, r.mode, r.credits, job.pages_charged
            FROM (VALUES (job.mode, job.pages_charged * job.credits_per_page),
                         ('ocr', job.pages_charged * job.ocr_credits_per_page)) AS r (mode, credits)
            WHERE r.mode = job.mode OR job.ocr
            ORDER BY r.mode
        ON CONFLICT (org_id, day, product, mode) DO UPDATE
            SET credits = usage_usagerollup.credits + EXCLUDED.credits,
                units = usage_usagerollup.units + EXCLUDED.units;
    END IF;
    RETURN NEXT job;
END
$$;
"""

DROP = """
DROP FUNCTION IF EXISTS usage_job_start(usage_job, integer, numeric, bigint);
DROP FUNCTION IF EXISTS usage_job_end(bigint, uuid, text, integer, timestamptz, date);
"""


def create_functions(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE, params=None)  # no placeholders: % is PL/pgSQL's


def drop_functions(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, params=None)


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0004_subscription_upgrade_pending_since"),
        ("usage", "0005_default_packs"),
    ]

    operations = [migrations.RunPython(create_functions, drop_functions)]

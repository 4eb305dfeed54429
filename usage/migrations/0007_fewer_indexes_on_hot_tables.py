"""Drops the indexes the hot tables paid for on every write and no query used: SlugField's
default index on product and mode (never searched alone), and the foreign-key index on org_id where
a composite index or unique constraint already starts with it. The ledger's period and author
indexes become partial (only overage and staff entries carry them).

The database side is plain DROP INDEX: AlterField would also drop and re-add each foreign key,
which re-checks every row of the ledger under a lock."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

# (index, table, column, also a varchar_pattern_ops twin "_like" on PostgreSQL)
DROPPED = [
    ("usage_job_mode_15d5a5b7", "usage_job", "mode", True),
    ("usage_job_product_7c4a64c3", "usage_job", "product", True),
    ("usage_ledgerentry_created_by_id_eda1674c", "usage_ledgerentry", "created_by_id", False),
    ("usage_ledgerentry_org_id_5698e028", "usage_ledgerentry", "org_id", False),
    ("usage_ledgerentry_period_id_ccf2060a", "usage_ledgerentry", "period_id", False),
    ("usage_usageevent_mode_4bb05ba7", "usage_usageevent", "mode", True),
    ("usage_usageevent_org_id_4235faa2", "usage_usageevent", "org_id", False),
    ("usage_usageevent_product_4a6d2ebe", "usage_usageevent", "product", True),
    ("usage_usagerollup_mode_6942bd5a", "usage_usagerollup", "mode", True),
    ("usage_usagerollup_org_id_bd3f20f1", "usage_usagerollup", "org_id", False),
    ("usage_usagerollup_product_19e0c0a1", "usage_usagerollup", "product", True),
]


def drop_indexes(apps, schema_editor):
    for name, _, _, like in DROPPED:
        schema_editor.execute(f'DROP INDEX IF EXISTS "{name}"')
        if like:
            schema_editor.execute(f'DROP INDEX IF EXISTS "{name}_like"')


def create_indexes(apps, schema_editor):
    for name, table, column, like in DROPPED:
        schema_editor.execute(f'CREATE INDEX "{name}" ON "{table}" ("{column}")')
        if like and schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(f'CREATE INDEX "{name}_like" ON "{table}" ("{column}" varchar_pattern_ops)')


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0004_subscription_upgrade_pending_since"),
        ("usage", "0006_job_hold_functions"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunPython(drop_indexes, create_indexes),
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="job",
                    name="mode",
                    field=models.SlugField(db_index=False, max_length=30),
                ),
                migrations.AlterField(
                    model_name="job",
                    name="product",
                    field=models.SlugField(db_index=False, max_length=30),
                ),
                migrations.AlterField(
                    model_name="ledgerentry",
                    name="created_by",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                migrations.AlterField(
                    model_name="ledgerentry",
                    name="org",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="ledger_entries",
                        to="accounts.organisation",
                    ),
                ),
                migrations.AlterField(
                    model_name="ledgerentry",
                    name="period",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="+",
                        to="accounts.billingperiod",
                    ),
                ),
                migrations.AlterField(
                    model_name="usageevent",
                    name="mode",
                    field=models.SlugField(db_index=False, max_length=30),
                ),
                migrations.AlterField(
                    model_name="usageevent",
                    name="org",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="usage_events",
                        to="accounts.organisation",
                    ),
                ),
                migrations.AlterField(
                    model_name="usageevent",
                    name="product",
                    field=models.SlugField(db_index=False, max_length=30),
                ),
                migrations.AlterField(
                    model_name="usagerollup",
                    name="mode",
                    field=models.SlugField(db_index=False, max_length=30),
                ),
                migrations.AlterField(
                    model_name="usagerollup",
                    name="org",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="usage_rollups",
                        to="accounts.organisation",
                    ),
                ),
                migrations.AlterField(
                    model_name="usagerollup",
                    name="product",
                    field=models.SlugField(db_index=False, max_length=30),
                ),
            ],
        ),
        migrations.AddIndex(
            model_name="ledgerentry",
            index=models.Index(
                condition=models.Q(("period__isnull", False)), fields=["period"], name="ledger_by_period"
            ),
        ),
        migrations.AddIndex(
            model_name="ledgerentry",
            index=models.Index(
                condition=models.Q(("created_by__isnull", False)),
                fields=["created_by"],
                name="ledger_by_author",
            ),
        ),
    ]

"""The default plan catalog of DESIGN §2. Staff edit it in admin afterwards."""

from decimal import Decimal

from django.db import migrations

PLANS = [
    # code, name, price_cents, monthly_credits, overage $/1,000, rpm, concurrent jobs, support, contract
    ("free", "Free", 0, 10_000, None, 20, 10, "Community", False),
    ("starter", "Starter", 5_000, 40_000, Decimal("1.25"), 120, 10, "Priority", False),
    ("pro", "Pro", 50_000, 400_000, Decimal("1.25"), 300, 20, "Dedicated", False),
    # Enterprise is priced per contract; without overrides it takes Pro's figures (DESIGN §7).
    ("enterprise", "Enterprise", 50_000, 400_000, Decimal("1.25"), 300, 20, "Dedicated", True),
]


def add_plans(apps, schema_editor):
    Plan = apps.get_model("accounts", "Plan")
    for order, (code, name, price, credits, rate, rpm, jobs, support, contract) in enumerate(PLANS):
        Plan.objects.update_or_create(
            code=code,
            defaults={
                "name": name,
                "price_cents": price,
                "monthly_credits": credits,
                "overage_rate": rate,
                "rpm": rpm,
                "concurrent_jobs": jobs,
                "support": support,
                "is_contract": contract,
                "sort_order": order,
            },
        )


class Migration(migrations.Migration):
    dependencies = [("accounts", "0001_initial")]
    operations = [migrations.RunPython(add_plans, migrations.RunPython.noop)]

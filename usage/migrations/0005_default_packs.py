"""Seeds the credit packs of DESIGN §2 (staff edit them in admin): $10 → 8,000; $50 → 44,000;
$200 → 200,000 credits, never expiring."""

from django.db import migrations

PACKS = [
    # price in cents, credits, sort order
    (1_000, 8_000, 10),
    (5_000, 44_000, 20),
    (20_000, 200_000, 30),
]


def add_packs(apps, schema_editor):
    CreditPack = apps.get_model("usage", "CreditPack")
    for price_cents, credits, sort_order in PACKS:
        if not CreditPack.objects.filter(price_cents=price_cents).exists():
            CreditPack.objects.create(price_cents=price_cents, credits=credits, sort_order=sort_order, active=True)


def remove_packs(apps, schema_editor):
    CreditPack = apps.get_model("usage", "CreditPack")
    CreditPack.objects.filter(price_cents__in=[p for p, _, _ in PACKS]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("usage", "0004_prepaid_credits"),
    ]

    operations = [migrations.RunPython(add_packs, remove_packs)]

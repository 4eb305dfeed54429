"""The default credit costs of DESIGN §2. Staff edit them in admin afterwards.

Parse: base 1, advanced 3 credits a page; OCR adds 1 credit a page (rows of mode `ocr`, for every
product); Extract 2, Classify, Split and Index 1 a page; audio 1 credit a second (Parse, metered
through usage events only).
"""

from django.db import migrations

OPERATIONS = [
    ("parse", "base", 1, "page"),
    ("parse", "advanced", 3, "page"),
    ("parse", "audio", 1, "second"),
    ("extract", "base", 2, "page"),
    ("classify", "base", 1, "page"),
    ("split", "base", 1, "page"),
    ("index", "base", 1, "page"),
] + [(product, "ocr", 1, "page") for product in ("parse", "extract", "classify", "split", "index")]


def add_operations(apps, schema_editor):
    Operation = apps.get_model("usage", "Operation")
    for product, mode, credits, unit in OPERATIONS:
        Operation.objects.update_or_create(
            product=product, mode=mode, defaults={"credits_per_unit": credits, "unit": unit}
        )


class Migration(migrations.Migration):
    dependencies = [("usage", "0001_initial")]
    operations = [migrations.RunPython(add_operations, migrations.RunPython.noop)]

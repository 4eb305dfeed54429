from django.core.management.base import BaseCommand, CommandError

from billing_site.errors import BillingError
from usage.demo import logins, seed_demo


class Command(BaseCommand):
    help = (
        "Creates the demo organisation (Pro, three members, 90 days of usage) and a staff user, "
        "unless they exist; prints the logins. Safe to run on every start."
    )

    def handle(self, *args, **options):
        try:
            result = seed_demo()
        except BillingError as error:
            raise CommandError(error.message) from None
        for line in logins(result):
            self.stdout.write(line)

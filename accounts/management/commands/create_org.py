import json

from django.core.management.base import BaseCommand, CommandError

from accounts.services import organisation_create
from billing_site.errors import BillingError


class Command(BaseCommand):
    help = 'Creates an organisation with its owner and subscription; prints {"org": id, "api_key": key}.'

    def add_arguments(self, parser):
        parser.add_argument("--name", required=True)
        parser.add_argument("--plan", required=True, help="free, starter, pro or enterprise")
        parser.add_argument("--owner-email", required=True)
        parser.add_argument("--password", help="Without it the owner cannot sign in until a password reset.")
        parser.add_argument("--monthly-credits", type=int, help="Per-subscription override")
        parser.add_argument("--rpm", type=int, help="Per-subscription override of requests per minute")
        parser.add_argument("--concurrent-jobs", type=int, help="Per-subscription override")

    def handle(self, *args, **o):
        try:
            org, api_key = organisation_create(
                name=o["name"],
                plan_code=o["plan"],
                owner_email=o["owner_email"],
                password=o["password"],
                monthly_credits=o["monthly_credits"],
                rpm=o["rpm"],
                concurrent_jobs=o["concurrent_jobs"],
            )
        except BillingError as error:
            raise CommandError(error.message) from None
        self.stdout.write(json.dumps({"org": org.pk, "api_key": api_key}))

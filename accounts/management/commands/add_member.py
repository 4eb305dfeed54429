from django.core.management.base import BaseCommand, CommandError

from accounts.models import Role
from accounts.services import member_add
from billing_site.errors import BillingError


class Command(BaseCommand):
    help = "Adds a person to an organisation with a role (owner, billing_admin or member)."

    def add_arguments(self, parser):
        parser.add_argument("--org", required=True, type=int, help="The id create_org printed")
        parser.add_argument("--email", required=True)
        parser.add_argument("--role", required=True, choices=Role.values)
        parser.add_argument("--password")

    def handle(self, *args, **o):
        try:
            membership = member_add(org_id=o["org"], email=o["email"], role=o["role"], password=o["password"])
        except BillingError as error:
            raise CommandError(error.message) from None
        self.stdout.write(
            f"{membership.user.email} is {membership.get_role_display()} of {membership.org} (org {membership.org_id})."
        )

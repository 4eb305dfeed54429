import pytest

from accounts.services import member_add
from tests.factories import OrgFactory
from tests.security.objects import World


@pytest.fixture
def world(request):
    org_a = OrgFactory(plan="starter", name="Tenant A")
    org_b = OrgFactory(plan="starter", name="Tenant B")
    owner_a, owner_b = (org.memberships.get(role="owner").user for org in (org_a, org_b))
    member = member_add(org_id=org_a.pk, email="member-of-a@example.com", role="member").user
    return World(request, org_a=org_a, owner_a=owner_a, member_a=member, org_b=org_b, owner_b=owner_b)

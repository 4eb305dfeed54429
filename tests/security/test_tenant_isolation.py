"""Tenant isolation: every URL that names an object (a page under /settings/, an invoice PDF, an
API job) answers 404 to another organisation and 403 to a role that may not, never shows the
object and never changes it; every admin URL sends a customer to the admin's login page.

The URLs come from the URL conf: each pattern with a parameter needs an entry in OBJECTS (how to
make, for organisation A, the object it names) unless it is admin's. A new page without an entry
fails `test_every_parameterised_url_is_in_the_matrix`, so it cannot be forgotten.
"""

import json

import pytest
from django.urls import reverse

from accounts.services import api_key_create
from tests.security.objects import OBJECTS, QUERY_OBJECTS, Target, job
from tests.security.routes import admin_routes, admin_url, parameterised_routes

pytestmark = pytest.mark.django_db


def _send(client, method, url, *, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if method == "GET":
        return client.get(url, headers=headers, follow=key is None)
    if key:
        return client.post(url, "{}", content_type="application/json", headers=headers)
    return client.post(url, headers=headers)


def _body(response) -> str:
    return b"".join(response.streaming_content if response.streaming else [response.content]).decode(
        errors="replace"
    )


def _refused(response, status, case, why):
    assert response.status_code == status, f"{why}: {response.status_code}, expected {status}"
    assert case.canary not in _body(response), f"{why}: the response shows the object"


# --- the matrix -------------------------------------------------------------------------------


def test_every_parameterised_url_is_in_the_matrix():
    """A pattern with a parameter outside admin must say how to make its object, and the table
    names no pattern that is gone."""
    names = {route.name for route in parameterised_routes() if route.namespace != "admin"}
    missing = sorted(names - set(OBJECTS))
    assert not missing, f"add these URL patterns to OBJECTS in tests/security/objects.py: {missing}"
    assert not set(OBJECTS) - names, f"OBJECTS names patterns that no longer exist: {set(OBJECTS) - names}"


CUSTOMER_ROUTES = [
    r for r in parameterised_routes() if r.namespace != "admin" and isinstance(OBJECTS.get(r.name), Target)
]


@pytest.mark.parametrize("route", CUSTOMER_ROUTES, ids=lambda r: r.name)
def test_another_organisation_gets_404_and_a_lower_role_403(route, world, client):
    target = OBJECTS[route.name]
    case = target.make(world)
    url = route.url(**case.values)
    assert route.resolves(url)
    before = case.snapshot()

    for method in target.methods:
        if target.api:
            _, key_b = api_key_create(org=world.org_b, name="B's key")
            _refused(_send(client, method, url, key=key_b), 404, case, f"{method} {url} with B's key")
        else:
            client.force_login(world.owner_b)
            response = _send(client, method, url)
            if target.shared:
                assert response.status_code == 200, f"{method} {url} as B's owner (the same for all)"
            else:
                _refused(response, 404, case, f"{method} {url} as B's owner")
            client.force_login(world.member_a)
            _refused(_send(client, method, url), 403, case, f"{method} {url} as A's member")
        assert case.snapshot() == before, f"{method} {url} changed A's object"

    # And the object is there for its owner: the refusals above were about who asked.
    for method in target.methods:
        if target.api:
            _, key_a = api_key_create(org=world.org_a, name="A's key")
            response = _send(client, method, url, key=key_a)
        else:
            client.force_login(world.owner_a)
            response = _send(client, method, url)
        assert response.status_code == target.owner_status[method], f"{method} {url} as A's owner"
        if method == "GET":
            assert case.canary in _body(response)


@pytest.mark.parametrize("label", sorted(QUERY_OBJECTS))
def test_objects_named_in_a_query_string_are_isolated_too(label, world, client):
    name, make, param, value_key = QUERY_OBJECTS[label]
    case = make(world)
    url = f"{reverse(name)}?{param}={case.values[value_key]}"
    client.force_login(world.owner_b)
    _refused(client.get(url), 404, case, f"GET {url} as B's owner")
    client.force_login(world.member_a)
    _refused(client.get(url), 403, case, f"GET {url} as A's member")
    client.force_login(world.owner_a)
    owner_view = client.get(url)
    assert owner_view.status_code == 200
    assert case.canary in owner_view.content.decode()


# --- admin: staff only ------------------------------------------------------------------------


def test_every_admin_url_sends_a_customer_to_the_admin_login(world, client):
    client.force_login(world.owner_a)  # an owner, but not staff
    login = reverse("admin:login")
    checked = 0
    for route in admin_routes():
        url = admin_url(route)
        for method in ("GET", "POST"):
            response = client.get(url) if method == "GET" else client.post(url, {"apply": "yes"})
            assert response.status_code == 302, f"{method} {url}: {response.status_code}"
            assert response["Location"].startswith(login), f"{method} {url} went to {response['Location']}"
            checked += 1
    assert checked > 100  # every model's list, add, change, delete and history pages, and more


def test_the_admin_login_page_tells_a_signed_in_customer_they_are_not_staff(world, client):
    client.force_login(world.owner_a)
    response = client.get(reverse("admin:login"))
    assert response.status_code == 200
    assert "not authorized" in response.content.decode()


def test_api_objects_are_not_reached_with_a_session_either(world, client):
    """The API takes a key, never a signed-in browser: A's owner's session gets 401, not A's job."""
    case = job(world)
    client.force_login(world.owner_a)
    response = client.get(f"/api/v1/jobs/{case.values['job_id']}")
    assert response.status_code == 401
    assert json.loads(response.content)["error"]["code"] == "UNAUTHENTICATED"

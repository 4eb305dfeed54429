"""Who may see which billing page (DESIGN §4): the signed-in user's organisation and role.

A user in several organisations picks one with the switcher; the choice is kept in the session.
Owners and billing admins may see every billing page; members only Overview and Usage.
"""

from functools import wraps

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied

from accounts.models import Membership

SESSION_KEY = "org_id"


def current_membership(request) -> Membership | None:
    """The membership of the organisation the signed-in user works in: the one chosen with the
    switcher, else their first. The same query loads all their memberships (for the switcher, see
    `user_memberships`) with each organisation's subscription, plan and current period."""
    if not request.user.is_authenticated:
        return None
    if not hasattr(request, "_membership"):
        found = Membership.objects.filter(user_id=request.user.pk).select_related(
            "org__subscription__plan", "org__subscription__current_period"
        )
        # Sorted here, by code point as the database's C collation does: an ORDER BY across the join
        # costs the ORM more time than the sort.
        memberships = sorted(found, key=lambda m: (m.org.name, m.pk))
        chosen = request.session.get(SESSION_KEY)
        membership = next((m for m in memberships if m.org_id == chosen), None)
        if membership is None and memberships:
            membership = min(memberships, key=lambda m: (m.created_at, m.pk))
        request._memberships = memberships
        request._membership = membership
    return request._membership


def user_memberships(request) -> list[Membership]:
    """All the signed-in user's memberships, by organisation name."""
    if current_membership(request) is None:
        return []
    return request._memberships


def billing_page(*, manage: bool):
    """Decorates a view of the billing section: signed-out visitors go to the login page, people
    without an organisation or (with manage=True) without an owner or billing-admin role get
    403. The view finds `request.membership` and `request.org` set."""

    def decorator(view):
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            membership = current_membership(request)
            if membership is None or (manage and not membership.can_manage_billing):
                raise PermissionDenied("Only owners and billing admins may see this page.")
            request.membership = membership
            request.org = membership.org
            return view(request, *args, **kwargs)

        return wrapper

    return decorator

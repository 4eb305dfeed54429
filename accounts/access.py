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
    if not request.user.is_authenticated:
        return None
    if hasattr(request, "_membership"):
        return request._membership
    memberships = Membership.objects.filter(user=request.user).select_related("org__subscription__plan")
    chosen = request.session.get(SESSION_KEY)
    membership = None
    if chosen is not None:
        membership = memberships.filter(org_id=chosen).first()
    if membership is None:
        membership = memberships.order_by("created_at", "pk").first()
    request._membership = membership
    return membership


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

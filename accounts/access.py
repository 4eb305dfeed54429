"""Who may see which billing page (DESIGN §4): the signed-in user's organisation and role.

A user in several organisations picks one with the switcher; the choice is kept in the session.
Owners and billing admins may see every billing page; members only Overview and Usage.
"""

from functools import cache, wraps

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied

from accounts.models import BillingPeriod, Membership, Organisation, Plan, Subscription
from billing_site.rows import Columns, load_joined, planned_cursor

SESSION_KEY = "org_id"


def current_membership(request) -> Membership | None:
    """The membership of the organisation the signed-in user works in: the one chosen with the
    switcher, else their first. The same query loads all their memberships (for the switcher, see
    `user_memberships`) with each organisation's subscription, plan and current period."""
    if not request.user.is_authenticated:
        return None
    if not hasattr(request, "_membership"):
        # Sorted here, by code point as the database's C collation does.
        memberships = sorted(_memberships_of(request.user.pk), key=lambda m: (m.org.name, m.pk))
        chosen = request.session.get(SESSION_KEY)
        membership = next((m for m in memberships if m.org_id == chosen), None)
        if membership is None and memberships:
            membership = min(memberships, key=lambda m: (m.created_at, m.pk))
        request._memberships = memberships
        request._membership = membership
    return request._membership


@cache
def _memberships_lookup() -> tuple[str, tuple[Columns, ...]]:
    """The SQL and column sets of `_memberships_of`, built once."""
    parts = (
        Columns(Membership, "m"),
        Columns(Organisation, "o"),
        Columns(Subscription, "s"),
        Columns(Plan, "p"),
        Columns(BillingPeriod, "b"),
    )
    membership, org, sub, plan, period = (part.model._meta.db_table for part in parts)
    sql = (
        f"SELECT {', '.join(part.sql for part in parts)} "  # noqa: S608 (our columns and tables)
        f"FROM {membership} m JOIN {org} o ON o.id = m.org_id JOIN {sub} s ON s.org_id = o.id "
        f"JOIN {plan} p ON p.id = s.plan_id LEFT JOIN {period} b ON b.id = s.current_period_id "
        "WHERE m.user_id = %s"
    )
    return sql, parts


def _memberships_of(user_id: int) -> list[Membership]:
    """The user's memberships with what select_related("org__subscription__plan",
    "org__subscription__current_period") would load, in one hand-written query: on every page the
    ORM's building of that join cost more than running it."""
    sql, parts = _memberships_lookup()
    with planned_cursor() as cursor:
        cursor.execute(sql, [user_id])
        rows = cursor.fetchall()
    memberships = []
    for row in rows:
        membership, org, sub, plan, period = load_joined(parts, row)  # period None: none yet
        Membership._meta.get_field("org").set_cached_value(membership, org)
        Organisation._meta.get_field("subscription").set_cached_value(org, sub)
        Subscription._meta.get_field("org").set_cached_value(sub, org)
        Subscription._meta.get_field("plan").set_cached_value(sub, plan)
        Subscription._meta.get_field("current_period").set_cached_value(sub, period)
        memberships.append(membership)
    return memberships


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

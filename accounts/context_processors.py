from accounts.access import current_membership, user_memberships
from billing_site.navigation import billing_tabs


def navigation(request):
    """What the header needs on every page: the organisation, the switcher and the role."""
    membership = current_membership(request)
    if membership is None:
        return {}
    return {
        "nav_membership": membership,
        "nav_org": membership.org,
        "nav_memberships": user_memberships(request),
        "nav_can_manage": membership.can_manage_billing,
        "nav_is_free": membership.org.subscription.plan.is_free,
        "billing_tabs": billing_tabs(membership.can_manage_billing),
    }

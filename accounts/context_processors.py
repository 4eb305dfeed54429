from accounts.access import current_membership
from accounts.models import Membership
from billing_site.navigation import billing_tabs


def navigation(request):
    """What the header needs on every page: the organisation, the switcher and the role."""
    membership = current_membership(request)
    if membership is None:
        return {}
    others = (
        Membership.objects.filter(user=request.user).select_related("org").order_by("org__name")
        if request.user.is_authenticated
        else []
    )
    return {
        "nav_membership": membership,
        "nav_org": membership.org,
        "nav_memberships": others,
        "nav_can_manage": membership.can_manage_billing,
        "nav_is_free": membership.org.subscription.plan.is_free,
        "billing_tabs": billing_tabs(membership.can_manage_billing),
    }

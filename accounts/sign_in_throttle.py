"""How django-axes counts and answers failed sign-ins (settings: AXES_*).

Failures are counted per e-mail and client address together; the e-mail is normalised the way
the sign-in form stores it, so "Ann@Example.com" and "ann@example.com" count as one.
"""

from django.conf import settings
from django.shortcuts import render

from accounts.forms import EmailLoginForm


def username(request, credentials: dict | None) -> str:
    """The e-mail a sign-in attempt was for, lower-cased and trimmed (AXES_USERNAME_CALLABLE)."""
    raw = (credentials or {}).get("username") or request.POST.get("username") or ""
    return raw.strip().lower()


def locked_out_message() -> str:
    minutes = int(settings.AXES_COOLOFF_TIME.total_seconds() // 60)
    return (
        f"Too many failed sign-ins for this e-mail: signing in is paused for {minutes} minutes. "
        "Try again later, or reset your password."
    )


def locked_out(request, original_response, credentials):
    """The sign-in page again, with the reason, as 429 Too Many Requests (AXES_LOCKOUT_CALLABLE)."""
    form = EmailLoginForm(request, initial={"username": username(request, credentials)})
    context = {
        "form": form,
        "locked_out": locked_out_message(),
        "next": request.POST.get("next") or request.GET.get("next", ""),
    }
    return render(request, "registration/login.html", context, status=429)

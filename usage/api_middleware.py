"""What every response under /api/v1/ gets, whatever view answers (DESIGN §7): the caller's API key
checked, a request id, the rate limit counted and shown in RateLimit-* headers, and every error
(401, 429, a stray 404 or 405, a 500) in the one JSON envelope.

An API request stops here: this middleware resolves and calls the view itself, so the middleware
below it in settings.MIDDLEWARE (sessions, CSRF, users, messages, the audit actor, htmx, the page
security policy, sign-in throttling), which serves the pages and has nothing to do for a Bearer
request, costs it nothing. What sits above (SecurityMiddleware, WhiteNoise) still applies."""

import logging
import secrets
import time

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.http import JsonResponse
from django.urls import Resolver404, resolve

from accounts.services import api_key_authenticate
from usage import rate_limits

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1/"
PUBLIC_PATHS = {"/api/v1/openapi.json"}
ANONYMOUS_RPM = 60

STATUS_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "INSUFFICIENT_CREDITS",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "FILE_TOO_LARGE",
    429: "RESOURCE_EXHAUSTED",
}


def error_response(
    request, status: int, code: str, message: str, details: dict | None = None
) -> JsonResponse:
    body = {
        "success": False,
        "error": {
            "code": code,
            "message": message,
            "request_id": getattr(request, "request_id", ""),
            "details": details or {},
        },
    }
    return JsonResponse(body, status=status)


def _client_address(request) -> str:
    return request.META.get("REMOTE_ADDR", "unknown")


class MeteringApiMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not request.path.startswith(API_PREFIX):
            return self.get_response(request)
        request.request_id = f"req_{secrets.token_hex(12)}"
        request.api_key = None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":  # auth schemes are case-insensitive (RFC 9110 §11.1)
            request.api_key = api_key_authenticate(token.strip())
        if request.api_key is not None:
            sub = request.api_key.org.subscription
            window = rate_limits.hit(f"org:{sub.org_id}", sub.rpm)
        else:
            window = rate_limits.hit(f"ip:{_client_address(request)}", ANONYMOUS_RPM)
        now = time.time()
        if not window.allowed:
            wait = window.retry_after(now)
            response = error_response(
                request,
                429,
                "RESOURCE_EXHAUSTED",
                f"Rate limit exceeded. Please retry after {wait} seconds.",
                {"retry_after": wait},
            )
        elif request.api_key is None and request.path not in PUBLIC_PATHS:
            response = error_response(
                request,
                401,
                "UNAUTHENTICATED",
                "Missing, unknown or revoked API key: send Authorization: Bearer <api key>.",
            )
        else:
            response = self._view_response(request)
            if response.status_code >= 400 and response.get("Content-Type", "") != "application/json":
                response = self._as_envelope(request, response)
        if response.status_code == 429 and "Retry-After" not in response:
            response["Retry-After"] = str(window.retry_after(now))
        response["RateLimit-Limit"] = str(window.limit)
        response["RateLimit-Remaining"] = str(window.remaining)
        response["RateLimit-Reset"] = str(window.reset)
        response["X-Request-Id"] = request.request_id
        return response

    def _view_response(self, request):
        """The view's answer, the middleware below skipped (as the module says); an exception goes
        through process_exception as Django would send it, and what that does not answer is raised
        to Django's handler."""
        try:
            match = resolve(request.path_info)
        except Resolver404:
            return error_response(request, 404, "NOT_FOUND", "Not found.")
        request.resolver_match = match
        try:
            return match.func(request, *match.args, **match.kwargs)
        except Exception as exception:
            response = self.process_exception(request, exception)
            if response is None:
                raise
            return response

    def _as_envelope(self, request, response):
        status = response.status_code
        if status >= 500:
            return error_response(
                request,
                status,
                "INTERNAL",
                "Something went wrong on our side; nothing was charged.",
            )
        message = {404: "Not found.", 405: f"{request.method} is not allowed here."}.get(
            status, "Request refused."
        )
        envelope = error_response(request, status, STATUS_CODES.get(status, "INVALID_ARGUMENT"), message)
        if "Allow" in response:  # a 405 must say which methods are allowed
            envelope["Allow"] = response["Allow"]
        return envelope

    def process_exception(self, request, exception):
        if not request.path.startswith(API_PREFIX):
            return None
        if isinstance(exception, SuspiciousOperation):  # the client's fault: 400, as Django answers
            logger.warning("Refused %s %s: %s", request.method, request.path, exception)
            message = (
                f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,} bytes."
                if isinstance(exception, RequestDataTooBig)
                else "Request refused."
            )
            return error_response(request, 400, "INVALID_ARGUMENT", message)
        if settings.DEBUG:
            return None
        logger.exception(
            "Unhandled error in %s %s (%s)",
            request.method,
            request.path,
            getattr(request, "request_id", ""),
        )
        return error_response(
            request, 500, "INTERNAL", "Something went wrong on our side; nothing was charged."
        )

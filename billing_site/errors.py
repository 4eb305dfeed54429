"""The one exception for broken billing rules: services raise it, the API and pages render it."""


class BillingError(Exception):
    def __init__(self, code: str, message: str, status: int = 400, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.details = details or {}


# The exact words DESIGN §3 fixes for an exhausted Free plan (a plain ASCII apostrophe).
FREE_CREDITS_EXHAUSTED = "You've exceeded the maximum number of credits for your plan"


def invalid(message: str) -> BillingError:
    return BillingError("INVALID_ARGUMENT", message, 400)


def not_found(message: str = "Not found.") -> BillingError:
    return BillingError("NOT_FOUND", message, 404)


def conflict(message: str) -> BillingError:
    return BillingError("CONFLICT", message, 409)


def insufficient_credits(message: str = FREE_CREDITS_EXHAUSTED) -> BillingError:
    return BillingError("INSUFFICIENT_CREDITS", message, 402)

"""What the metering-API tests share: the error envelope check and balance look-ups."""

import re

from usage.models import CreditAccount


def assert_error(response, status, code):
    """The one error envelope: exactly these keys, and the request id of the X-Request-Id header.
    Returns the error object."""
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"success", "error"}
    assert body["success"] is False
    error = body["error"]
    assert set(error) == {"code", "message", "request_id", "details"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], dict)
    assert re.fullmatch(r"req_[0-9a-f]{24}", error["request_id"])
    assert error["request_id"] == response["X-Request-Id"]
    return error


def balance(api):
    """GET /api/v1/balance, which must answer 200."""
    response = api.get("balance")
    assert response.status_code == 200, response.content
    return response.json()


def credits_left(org):
    return CreditAccount.objects.get(org=org).balance

"""The metering API, /api/v1/ (DESIGN §7). django-ninja generates /api/v1/openapi.json from these
schemas; the API key, rate limits and headers are applied by usage.api_middleware."""

import json
import re
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Literal

from django.http import Http404, JsonResponse
from ninja import Field, Header, NinjaAPI, Query, Schema, Status
from ninja.errors import HttpError, ValidationError
from ninja.parser import Parser
from ninja.security import HttpBearer
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StrictBool,
    StrictInt,
    StringConstraints,
)

from accounts import clock
from billing_site.errors import BillingError
from billing_site.money import dollars
from usage import selectors, services
from usage.api_middleware import error_response
from usage.models import Job


class ApiKeyAuth(HttpBearer):
    """The key was already checked by the middleware; this declares it in the OpenAPI document."""

    def __call__(self, request):
        return getattr(request, "api_key", None)

    def authenticate(self, request, token):  # pragma: no cover - __call__ answers
        return getattr(request, "api_key", None)


class DuplicateKey(ValueError):
    """A JSON object of the body names the same key twice."""


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise DuplicateKey(f'Malformed JSON body: the key "{twice}" appears twice in one object.')
    return found


class StrictJsonParser(Parser):
    """Request bodies as JSON, refusing an object that names a key twice: JSON parsers disagree on
    which of the two values wins, so such a request means different things to different readers."""

    def parse_body(self, request):
        return json.loads(request.body, object_pairs_hook=_no_duplicate_keys)


api = NinjaAPI(
    title="Metering API",
    version="1.0",
    description="Credits, jobs and usage for the document-AI API. Authenticate with `Authorization: Bearer <api key>`.",
    urls_namespace="api",
    docs_url=None,
    auth=ApiKeyAuth(),
    parser=StrictJsonParser(),
)


# --- errors: one envelope ---------------------------------------------------------------------


def _first_problem(errors: list[dict]) -> str:
    if not errors:
        return "Invalid request."
    e = errors[0]
    where = ".".join(
        str(part) for part in e.get("loc", ()) if part not in ("body", "payload", "query", "header")
    )
    message = e.get("msg", "is invalid")
    if e.get("type") == "missing":
        message = "is required" if where else "A JSON object body is required."
    elif e.get("type") == "value_error":  # our own validators' words, without pydantic's prefix
        message = message.removeprefix("Value error, ")
    elif e.get("type") == "extra_forbidden":
        message = "is not a field of this request"
    return f"{where}: {message}" if where else message


@api.exception_handler(ValidationError)
def _validation_error(request, exc):
    return error_response(
        request, 400, "INVALID_ARGUMENT", _first_problem(exc.errors), {"errors": _plain(exc.errors)}
    )


def _plain(errors):
    return [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in errors][:20]


@api.exception_handler(BillingError)
def _billing_error(request, exc):
    response = error_response(request, exc.status, exc.code, exc.message, exc.details)
    if exc.status == 429 and "retry_after" in exc.details:
        response["Retry-After"] = str(exc.details["retry_after"])
    return response


@api.exception_handler(HttpError)
def _http_error(request, exc):
    code = (
        "INVALID_ARGUMENT"
        if exc.status_code == 400
        else "UNAUTHENTICATED"
        if exc.status_code == 401
        else "INVALID_ARGUMENT"
    )
    if isinstance(exc.__cause__, DuplicateKey):  # ninja wraps what the parser raised
        message = str(exc.__cause__)
    else:
        message = "Malformed JSON body." if exc.status_code == 400 else str(exc)
    return error_response(request, exc.status_code, code, message)


@api.exception_handler(Http404)
def _not_found(request, exc):
    return error_response(request, 404, "NOT_FOUND", "Not found.")


# --- schemas ---------------------------------------------------------------------------------

Slug = Annotated[str, StringConstraints(min_length=1, max_length=30)]
Count = Annotated[StrictInt, Field(ge=1)]

# Only what the event columns can hold is accepted: a larger count, a NUL byte (PostgreSQL text) or a
# moment outside the years 1-9999 in UTC would be a 500 (or on PostgreSQL a row that cannot be read).
MAX_EVENT_UNITS = 2_147_483_647
EventId = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")]


def _in_utc(moment: datetime) -> datetime:
    """Event timestamps are kept in UTC; one without an offset is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("must fall between the years 1 and 9999 in UTC") from None


def _iso_text(pattern: str, form: str) -> BeforeValidator:
    """Dates and moments come only as ISO 8601 text, as the document says: left alone, pydantic
    would also read a number, or a string of digits, as a Unix time (`end=0` as 1 Jan 1970)."""

    def check(value):
        if isinstance(value, str) and re.match(pattern, value):
            return value
        raise ValueError(f"must be {form}")

    return BeforeValidator(check)


IsoDate = Annotated[date, _iso_text(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z", "a date such as 2026-11-23")]
UtcDatetime = Annotated[
    datetime,
    _iso_text(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T", "an ISO 8601 date and time such as 2026-11-23T10:00:00Z"),
    AfterValidator(_in_utc),
]


class Strict(BaseModel):
    """Request bodies: plain pydantic models (validating through ninja's Schema, which resolves
    Django attributes, costs several times more on a 1,000-event batch)."""

    model_config = ConfigDict(extra="forbid")


class ErrorBody(Schema):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(examples=["RESOURCE_EXHAUSTED"])
    message: str
    request_id: str = Field(pattern=r"^req_[0-9a-f]{24}$", description="Also in the X-Request-Id header")
    details: dict


class ErrorOut(Schema):
    """Every error answer: the one envelope (DESIGN §7)."""

    model_config = ConfigDict(extra="forbid")

    success: Literal[False]
    error: ErrorBody


class JobIn(Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "product": "parse",
                    "mode": "base",
                    "ocr": False,
                    "pages": 10,
                    "file_type": "pdf",
                    "file_size": 1_048_576,
                }
            ]
        },
    )

    product: Slug
    mode: Slug = "base"
    ocr: StrictBool = False
    pages: Annotated[StrictInt, Field(ge=1, le=services.MAX_PAGES_PER_JOB)]
    file_type: Literal["pdf", "docx", "xlsx", "pptx"]
    file_size: Count = Field(description="Bytes")


class JobStarted(Schema):
    id: uuid.UUID
    status: Literal["running"]
    credits_reserved: int


class CompleteIn(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"pages": 8}]})

    pages: Annotated[StrictInt, Field(ge=1, le=services.MAX_PAGES_PER_JOB)] | None = None


class JobFinished(Schema):
    id: uuid.UUID
    status: Literal["succeeded", "failed"]
    credits_charged: int


class JobOut(Schema):
    id: uuid.UUID
    status: Literal["running", "succeeded", "failed"]
    product: str
    mode: str
    ocr: bool
    pages: int
    file_type: str
    file_size: int
    credits_reserved: int
    credits_charged: int
    created_at: datetime
    finished_at: datetime | None


class OverageOut(Schema):
    enabled: bool
    credits: int
    amount: str = Field(description="Dollars, two decimals")
    cap: str | None = Field(description="Dollars per month, two decimals; null for no cap")


class BucketOut(Schema):
    bucket: Literal["plan", "bonus", "purchased"]
    credits: int
    expires_at: datetime | None


class BalanceOut(Schema):
    plan: str
    credits_remaining: int
    credits_included: int
    credits_used_this_period: int
    period_start: datetime
    period_end: datetime
    overage: OverageOut
    buckets: list[BucketOut]


class UsageQuery(Schema):
    start: IsoDate | None = None
    end: IsoDate | None = None
    group_by: Literal["day", "product", "mode"] = "day"


class UsageRowOut(Schema):
    key: str
    credits: int
    units: int


class UsageOut(Schema):
    start: date
    end: date
    total_credits: int
    rows: list[UsageRowOut]


class EventIn(Strict):
    id: EventId
    product: Slug
    mode: Slug
    units: Annotated[StrictInt, Field(ge=1, le=MAX_EVENT_UNITS)]
    timestamp: UtcDatetime


class EventsIn(Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "events": [
                        {
                            "id": "evt_1",
                            "product": "parse",
                            "mode": "audio",
                            "units": 90,
                            "timestamp": "2026-11-23T10:00:00Z",
                        }
                    ]
                }
            ]
        },
    )

    events: Annotated[list[EventIn], Field(min_length=1, max_length=services.MAX_EVENTS_PER_BATCH)]


class EventsAccepted(Schema):
    accepted: int
    duplicates: int


def errors(*statuses: int) -> dict[int, type[ErrorOut]]:
    """The error answers an operation can give, each in the envelope. Every operation can answer
    401 (no valid key) and 429 (rate limit); request validation answers 400, never 422."""
    return dict.fromkeys(sorted({401, 429, *statuses}), ErrorOut)


# --- endpoints -------------------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@api.get("/balance", response={200: BalanceOut, **errors()})
def balance(request):
    b = selectors.balance_for(sub=request.api_key.org.subscription)
    return {
        "plan": b.plan_code,
        "credits_remaining": b.credits_remaining,
        "credits_included": b.credits_included,
        "credits_used_this_period": b.credits_used_this_period,
        "period_start": _iso(b.period_start),
        "period_end": _iso(b.period_end),
        "overage": {
            "enabled": b.overage_enabled,
            "credits": b.overage_credits,
            "amount": dollars(b.overage_cents),
            "cap": None if b.overage_cap_cents is None else dollars(b.overage_cap_cents),
        },
        "buckets": [
            {
                "bucket": g.bucket,
                "credits": g.credits,
                "expires_at": g.expires_at and _iso(g.expires_at),
            }
            for g in b.buckets
        ],
    }


MAX_USAGE_DAYS = 366


@api.get("/usage", response={200: UsageOut, **errors(400)})
def usage(request, q: Query[UsageQuery]):
    # An unknown parameter is refused like an unknown body field: a typo such as `group-by`
    # would otherwise answer, silently, for the default grouping.
    unknown = sorted(set(request.GET) - set(UsageQuery.model_fields))
    if unknown:
        raise BillingError(
            "INVALID_ARGUMENT",
            f"Unknown query parameter {unknown[0]!r}: use start, end and group_by.",
            400,
            {"field": unknown[0]},
        )
    end = q.end or clock.today()
    try:
        start = q.start or end - timedelta(days=29)
    except OverflowError:
        raise BillingError(
            "INVALID_ARGUMENT", "Give a start date: end is too early for the default.", 400
        ) from None
    if start > end:
        raise BillingError("INVALID_ARGUMENT", "start must be on or before end.", 400)
    if (end - start).days >= MAX_USAGE_DAYS:
        raise BillingError("INVALID_ARGUMENT", f"Ask for at most {MAX_USAGE_DAYS} days at a time.", 400)
    rows = selectors.usage_rows(org_id=request.api_key.org_id, start=start, end=end, group_by=q.group_by)
    return {
        "start": start,
        "end": end,
        "total_credits": sum(r.credits for r in rows),
        "rows": [{"key": r.key, "credits": r.credits, "units": r.units} for r in rows],
    }


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="A replay with the same body returns the original 201; a different body is 409.",
    ),
]


# What a client does next with a started job's id; also the paths schemathesis's stateful tests walk.
JOB_LINKS = {
    name: {"operationId": f"usage_api_{operation}", "parameters": {"job_id": "$response.body#/id"}}
    for name, operation in [
        ("GetJob", "job_detail"),
        ("CompleteJob", "job_complete"),
        ("FailJob", "job_fail"),
    ]
}


@api.post(
    "/jobs",
    response={201: JobStarted, **errors(400, 402, 409, 413)},
    openapi_extra={"responses": {201: {"links": JOB_LINKS}}},
)
def job_create(request, payload: JobIn, idempotency_key: IdempotencyKey = None):
    body = payload.model_dump()
    job, _ = services.job_start(
        sub=request.api_key.org.subscription,
        req=services.JobRequest(**body),
        idempotency_key=idempotency_key,
        body_hash=services.request_hash(body),
    )
    # The two job answers are built here, not by ninja from JobStarted and JobFinished (which still
    # document them): validating and rendering a three-field answer through pydantic was 2% of the
    # jobs path's CPU. Schemathesis checks each answer against the document (test_api_fuzz.py).
    return JsonResponse(
        {"id": job.id, "status": "running", "credits_reserved": job.credits_reserved}, status=201
    )


def _job_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise BillingError("NOT_FOUND", "No job with this id.", 404) from None


@api.post("/jobs/{job_id}/complete", response={200: JobFinished, **errors(400, 404, 409)})
def job_complete(request, job_id: str, payload: CompleteIn | None = None):
    pages = payload.pages if payload else None
    job = services.job_complete(org_id=request.api_key.org_id, job_id=_job_id(job_id), pages=pages)
    return JsonResponse({"id": job.id, "status": "succeeded", "credits_charged": job.credits_charged})


@api.post("/jobs/{job_id}/fail", response={200: JobFinished, **errors(404, 409)})
def job_fail(request, job_id: str):
    job = services.job_fail(org_id=request.api_key.org_id, job_id=_job_id(job_id))
    return {"id": job.id, "status": "failed", "credits_charged": 0}


@api.get("/jobs/{job_id}", response={200: JobOut, **errors(404)})
def job_detail(request, job_id: str):
    job = Job.objects.filter(org_id=request.api_key.org_id, pk=_job_id(job_id)).first()
    if job is None:
        raise BillingError("NOT_FOUND", "No job with this id.", 404)
    return job


@api.post("/usage/events", response={202: EventsAccepted, **errors(400, 402, 409)})
def usage_events(request, payload: EventsIn):
    events = [services.EventIn(e.id, e.product, e.mode, e.units, e.timestamp) for e in payload.events]
    accepted, duplicates = services.usage_events_record(sub=request.api_key.org.subscription, events=events)
    return Status(202, {"accepted": accepted, "duplicates": duplicates})

"""Money: integer cents everywhere, Decimal only for per-unit rates, half-up once per line."""

from decimal import ROUND_HALF_UP, Decimal


def overage_cents(credits: int, rate_per_1000: Decimal) -> int:
    """The price of `credits` at `rate_per_1000` dollars per 1,000 credits, pro rata, in cents,
    rounded half-up once: 1,252 credits at $1.25 -> $1.565 -> 157."""
    exact = Decimal(credits) * rate_per_1000 * 100 / 1000
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def prorate_cents(amount_cents: int, numerator: int, denominator: int) -> int:
    """amount × numerator / denominator, rounded half-up to the cent."""
    exact = Decimal(amount_cents) * numerator / denominator
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def dollars(cents: int) -> str:
    """Cents as the API's dollar string with two decimals: 1250 -> "12.50"."""
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}{cents // 100}.{cents % 100:02d}"

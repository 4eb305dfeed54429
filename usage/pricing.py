"""The cost estimator's math (DESIGN §4, /pricing/): pages per month per Parse mode in, credits
and the monthly cost on each public plan out, with the cheapest marked.

A plan's monthly cost is its fee plus the overage at its rate for the credits above its quota,
rounded half-up to cents once (the invoice rule). A plan without overage (Free) cannot take more
than its quota; a contract plan (Enterprise) is "Contact sales".
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from accounts.models import Plan
from billing_site.money import overage_cents
from usage.selectors import catalog_costs

PRODUCT = "parse"


@dataclass(frozen=True)
class Credits:
    """Credits a month for the pages entered, by mode."""

    base: int
    advanced: int
    ocr: int
    base_per_page: int
    advanced_per_page: int
    ocr_per_page: int  # base + the OCR surcharge

    @property
    def total(self) -> int:
        return self.base + self.advanced + self.ocr


@dataclass(frozen=True)
class PlanCost:
    plan: Plan
    contact_sales: bool = False
    not_enough: bool = False
    overage_credits: int = 0
    overage_cents: int = 0
    total_cents: int | None = None
    cheapest: bool = False


def credits_for(*, base: int, advanced: int, ocr: int, costs: Mapping[tuple[str, str], int]) -> Credits:
    """Credits for the pages at the catalog's prices; "with OCR" pages cost parse/base + parse/ocr."""
    base_per_page = costs.get((PRODUCT, "base"), 0)
    advanced_per_page = costs.get((PRODUCT, "advanced"), 0)
    ocr_per_page = base_per_page + costs.get((PRODUCT, "ocr"), 0)
    return Credits(
        base=base * base_per_page,
        advanced=advanced * advanced_per_page,
        ocr=ocr * ocr_per_page,
        base_per_page=base_per_page,
        advanced_per_page=advanced_per_page,
        ocr_per_page=ocr_per_page,
    )


def plan_cost(*, plan: Plan, credits: int) -> PlanCost:
    if plan.is_contract:
        return PlanCost(plan=plan, contact_sales=True)
    over = max(0, credits - plan.monthly_credits)
    if over and plan.overage_rate is None:
        return PlanCost(plan=plan, not_enough=True, overage_credits=over)
    extra = overage_cents(over, plan.overage_rate) if over else 0
    return PlanCost(
        plan=plan, overage_credits=over, overage_cents=extra, total_cents=plan.price_cents + extra
    )


def costs_for(*, plans: Iterable[Plan], credits: int) -> list[PlanCost]:
    """Each plan's cost; every plan at the lowest total is marked cheapest (ties share it)."""
    rows = [plan_cost(plan=plan, credits=credits) for plan in plans]
    totals = [row.total_cents for row in rows if row.total_cents is not None]
    if not totals:
        return rows
    lowest = min(totals)
    return [replace(row, cheapest=row.total_cents == lowest) for row in rows]


def estimate_rates() -> Credits:
    """The catalog's credits a page for each mode (the pages themselves zero)."""
    return credits_for(base=0, advanced=0, ocr=0, costs=catalog_costs())


@dataclass(frozen=True)
class Estimate:
    credits: Credits
    plans: list[PlanCost]


def estimate(*, base: int, advanced: int, ocr: int) -> Estimate:
    """The estimate with the current catalog and plan table."""
    credits = credits_for(base=base, advanced=advanced, ocr=ocr, costs=catalog_costs())
    return Estimate(credits=credits, plans=costs_for(plans=Plan.objects.all(), credits=credits.total))

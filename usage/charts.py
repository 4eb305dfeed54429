"""The Usage page's table and Plotly figures, built from the daily rollups (never from raw events).

Figures are plain dicts in Plotly's JSON schema ({"data": [...], "layout": {...}}): the page embeds
them with `json_script` and static/js/charts.js draws them. Building dicts skips plotly's
graph_objects validation (~25 ms a figure, STYLE); the tests validate the same dicts with
`plotly.graph_objects.Figure` instead, so a typo still fails loudly.

Colours are fixed per product and per mode, so Parse is the same blue on every chart; they are
mid-tones that read on both the light and the dark page. Backgrounds are transparent and the font
colour is the page's, set by charts.js.
"""

from dataclasses import dataclass
from datetime import date, timedelta
from functools import cached_property
from zlib import crc32

from accounts.models import BillingPeriod
from usage import selectors
from usage.selectors import UsageLine
from usage.usage_forms import UsageRange

PRODUCT_COLOURS = {
    "parse": "#4c6ef5",  # blue
    "extract": "#12b886",  # teal
    "classify": "#f59f00",  # amber
    "split": "#e64980",  # pink
    "index": "#7950f2",  # violet
}
MODE_COLOURS = {
    "base": "#339af0",  # light blue
    "advanced": "#9c36b5",  # grape
    "ocr": "#fd7e14",  # orange
    "audio": "#2f9e44",  # green
}
COLOURS = {"product": PRODUCT_COLOURS, "mode": MODE_COLOURS}
# For products or modes staff add later: picked by a hash of the name, so stable across pages.
SPARE_COLOURS = ("#1098ad", "#d6336c", "#5c940d", "#e67700", "#3b5bdb", "#868e96")
USED_COLOUR = "#4c6ef5"
QUOTA_COLOUR = "#f03e3e"

LABELS = {
    "parse": "Parse",
    "extract": "Extract",
    "classify": "Classify",
    "split": "Split",
    "index": "Index",
    "base": "Base",
    "advanced": "Advanced",
    "ocr": "OCR",
    "audio": "Audio",
}
GROUP_LABELS = {"product": "Product", "mode": "Mode"}

FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", sans-serif'
GRID = "rgba(128, 128, 128, 0.25)"
TRANSPARENT = "rgba(0, 0, 0, 0)"


def colour_for(group_by: str, key: str) -> str:
    known = COLOURS[group_by].get(key)
    return known or SPARE_COLOURS[crc32(key.encode()) % len(SPARE_COLOURS)]


def label_for(key: str) -> str:
    return LABELS.get(key) or key.replace("-", " ").replace("_", " ").capitalize()


def ordered_keys(group_by: str, keys) -> list[str]:
    """Known products (or modes) in the catalog's order, then any others alphabetically."""
    known = list(COLOURS[group_by])
    return sorted(set(keys), key=lambda k: (known.index(k), "") if k in known else (len(known), k))


def days_of(start: date, end: date) -> list[date]:
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


# --- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridColumn:
    key: str
    label: str
    colour: str


@dataclass(frozen=True)
class GridRow:
    day: date
    cells: list[int]
    total: int


@dataclass(frozen=True)
class UsageGrid:
    """Credits per day (every day of the range) and per product or mode, with totals."""

    usage_range: UsageRange
    columns: list[GridColumn]
    rows: list[GridRow]
    totals: list[int]
    total: int

    @property
    def is_empty(self) -> bool:
        return self.total == 0

    @property
    def group_label(self) -> str:
        return GROUP_LABELS[self.usage_range.group_by]


def usage_grid(*, usage_range: UsageRange, lines: list[UsageLine]) -> UsageGrid:
    """`lines`: usage_lines() over at least the range (lines outside it are left out)."""
    group_by = usage_range.group_by
    lines = [line for line in lines if usage_range.start <= line.day <= usage_range.end]
    keys = ordered_keys(group_by, (getattr(line, group_by) for line in lines if line.credits))
    index = {k: i for i, k in enumerate(keys)}
    by_day: dict[date, list[int]] = {}
    for line in lines:
        key = getattr(line, group_by)
        if key in index:
            by_day.setdefault(line.day, [0] * len(keys))[index[key]] += line.credits
    rows = []
    for day in days_of(usage_range.start, usage_range.end):
        cells = by_day.get(day) or [0] * len(keys)
        rows.append(GridRow(day, cells, sum(cells)))
    totals = [sum(r.cells[i] for r in rows) for i in range(len(keys))]
    columns = [GridColumn(k, label_for(k), colour_for(group_by, k)) for k in keys]
    return UsageGrid(usage_range, columns, rows, totals, sum(totals))


# --- the figures -------------------------------------------------------------------------------


def _layout(**extra) -> dict:
    layout = {
        "paper_bgcolor": TRANSPARENT,
        "plot_bgcolor": TRANSPARENT,
        "font": {"family": FONT, "size": 13},
        "margin": {"l": 8, "r": 12, "t": 48, "b": 8},  # automargin adds room for the axes
        "hovermode": "x unified",
        "legend": {
            "orientation": "h",
            "traceorder": "normal",  # the table's order, not the stack's
            "x": 0,
            "xanchor": "left",
            "y": 1.02,
            "yanchor": "bottom",
        },
        "xaxis": {
            "title": {"text": "Date"},
            "type": "date",
            "tickformat": "%-d %b",
            "hoverformat": "%-d %b %Y",
            "gridcolor": GRID,
            "linecolor": GRID,
            "automargin": True,
        },
        "yaxis": {
            "title": {"text": "Credits"},
            "tickformat": ",d",
            "rangemode": "tozero",
            "gridcolor": GRID,
            "zerolinecolor": GRID,
            "automargin": True,
        },
    }
    layout.update(extra)
    return layout


def daily_figure(grid: UsageGrid) -> dict:
    """Daily credits as bars stacked by product (or mode); hover lists each and the day's total."""
    x = [r.day.isoformat() for r in grid.rows]
    data = []
    for i, column in enumerate(grid.columns):
        data.append(
            {
                "type": "bar",
                "name": column.label,
                "x": x,
                # None, not 0: a product without usage that day stays out of the hover list.
                "y": [r.cells[i] or None for r in grid.rows],
                "marker": {"color": column.colour},
                "hovertemplate": f"{column.label}: %{{y:,}} credits<extra></extra>",
            }
        )
    data.append(
        {
            "type": "scatter",
            "mode": "markers",
            "name": "Total",
            "x": x,
            "y": [r.total for r in grid.rows],
            "marker": {"opacity": 0, "size": 1},
            "showlegend": False,
            "hovertemplate": "Total: %{y:,} credits<extra></extra>",
        }
    )
    layout = _layout(barmode="stack", bargap=0.15)
    layout["legend"]["title"] = {"text": f"{grid.group_label}: "}
    if len(x) <= 14:
        layout["xaxis"]["dtick"] = 86_400_000  # one tick a day for short ranges
    return {"data": data, "layout": layout}


@dataclass(frozen=True)
class PeriodUse:
    """The current billing period's use so far, for the cumulative chart and its caption."""

    first_day: date
    last_day: date  # the period's last day (its end is exclusive)
    quota: int
    used: int
    days: list[date]
    cumulative: list[int]

    @property
    def has_usage(self) -> bool:
        return self.used > 0


def period_shown(*, period: BillingPeriod, today: date) -> tuple[date, date] | None:
    """The days of the period the cumulative chart covers: from its first day to today (or its last
    day, if it has ended); None before it begins."""
    first = period.start.date()
    last = min(today, (period.end - timedelta(days=1)).date())
    return (first, last) if first <= last else None


def period_use(*, period: BillingPeriod, today: date, lines: list[UsageLine]) -> PeriodUse:
    """`lines`: usage_lines() over at least period_shown() (lines outside it are left out)."""
    first = period.start.date()
    last = (period.end - timedelta(days=1)).date()
    shown = period_shown(period=period, today=today)
    days = days_of(*shown) if shown else []
    per_day = dict.fromkeys(days, 0)
    for line in lines:
        if line.day in per_day:
            per_day[line.day] += line.credits
    cumulative, running = [], 0
    for day in days:
        running += per_day[day]
        cumulative.append(running)
    return PeriodUse(first, last, period.monthly_credits, running, days, cumulative)


def period_figure(use: PeriodUse) -> dict:
    """Credits used since the period began, day by day, against the period's quota line."""
    all_days = [d.isoformat() for d in days_of(use.first_day, use.last_day)]
    top = max(use.quota, use.used) or 1
    data = [
        {
            "type": "scatter",
            "mode": "lines+markers" if len(use.days) <= 2 else "lines",
            "name": "Used",
            "x": [d.isoformat() for d in use.days],
            "y": use.cumulative,
            "line": {"color": USED_COLOUR, "width": 3},
            "fill": "tozeroy",
            "fillcolor": "rgba(76, 110, 245, 0.18)",
            "hovertemplate": "Used so far: %{y:,} credits<extra></extra>",
        },
        {
            "type": "scatter",
            "mode": "lines",
            "name": "Quota",
            "x": all_days,
            "y": [use.quota] * len(all_days),
            "line": {"color": QUOTA_COLOUR, "width": 2, "dash": "dash"},
            "hovertemplate": "Quota: %{y:,} credits<extra></extra>",
        },
    ]
    layout = _layout(
        annotations=[
            {
                "x": all_days[-1],
                "y": use.quota,
                "xanchor": "right",
                "yanchor": "bottom",
                "text": f"Quota: {use.quota:,} credits",
                "showarrow": False,
                "font": {"color": QUOTA_COLOUR},
            }
        ]
    )
    layout["xaxis"]["range"] = [all_days[0], all_days[-1]]
    layout["yaxis"]["range"] = [0, round(top * 1.12)]
    return {"data": data, "layout": layout}


# --- the page's report -------------------------------------------------------------------------

# The Usage page caches two fragments of its HTML (templates/billing/usage.html) for CACHE_SECONDS:
# the range form, and the results under UsageReport.key. Bump CACHE_VERSION when their markup or
# what goes into them changes, so that no page shows what the previous code cached.
CACHE_VERSION = 1
CACHE_SECONDS = 600


class UsageReport:
    """What the Usage page shows from the rollups: the range's table and daily figure, the current
    period's use so far and its figure.

    Making one reads only what the rollups over those days hold (selectors.usage_version) to make
    `key`, which names exactly this content: rollups only grow, so new usage, whichever process
    wrote it, makes a new key at once, as does a new quota or period. The rest is built on first
    use from one read of the rollups, which a page that has its HTML cached under `key` skips."""

    def __init__(self, *, org_id: int, usage_range: UsageRange, period: BillingPeriod, today: date):
        self.usage_range = usage_range
        self._org_id = org_id
        self._period = period
        self._today = today
        shown = period_shown(period=period, today=today)
        self._spans = [(usage_range.start, usage_range.end)] + ([shown] if shown else [])
        version = selectors.usage_version(org_id=org_id, spans=self._spans)
        self.key = ":".join(
            str(part)
            for part in (
                f"usage-report-v{CACHE_VERSION}",
                org_id,
                usage_range.start,
                usage_range.end,
                usage_range.group_by,
                period.pk,
                period.start.date(),
                period.end.date(),
                period.monthly_credits,
                shown[1] if shown else "-",
                *version,
            )
        )

    @cached_property
    def _lines(self) -> list[UsageLine]:
        return selectors.usage_lines(org_id=self._org_id, spans=self._spans)

    @cached_property
    def grid(self) -> UsageGrid:
        return usage_grid(usage_range=self.usage_range, lines=self._lines)

    @cached_property
    def period(self) -> PeriodUse:
        return period_use(period=self._period, today=self._today, lines=self._lines)

    @cached_property
    def daily_figure(self) -> dict | None:
        return None if self.grid.is_empty else daily_figure(self.grid)

    @cached_property
    def period_figure(self) -> dict | None:
        return period_figure(self.period) if self.period.has_usage else None

"""What each benchmark hands back, and the table `make bench` ends with."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    path: str
    ours: str
    ceiling: str
    ratio: str
    target: str
    met: bool


@dataclass
class Outcome:
    rows: list[Row] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def table(rows: list[Row]) -> str:
    header = ("path", "ours", "ceiling", "ratio", "target")
    cells = [header] + [
        (r.path, r.ours, r.ceiling, r.ratio, f"{r.target} {'met' if r.met else 'MISSED'}") for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def rate(value: float) -> str:
    return f"{value:,.0f}"

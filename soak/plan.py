"""What one soak run does: how many threads and operations, how much may reach Stripe, how many
months of billing time the ticks cover, and the seed of its random choices (no Django needed, so
`python -m soak.run --help` answers before anything is set up)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class SoakPlan:
    threads: int = 50
    operations: int = 10_000
    stripe_budget: int = 250  # purchases, upgrades and refunds; recharges and invoices come on top
    months: int = 6  # of billing time the ticks cover
    seed: int = 2027

    @property
    def ticks(self) -> int:
        return max(6, self.operations // 100)

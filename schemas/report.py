"""The run report (`run_report.json` beside the embeddings): what a run read, embedded and dead-lettered."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RunReport:
    job: str
    read: int
    embedded: int
    dead_lettered: int
    dead_lettered_by_reason: dict[str, int]
    seconds: float
    rows_per_second: float
    error_rate: float
    max_error_rate: float
    outputs: dict[str, str]
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def reconciled(self) -> bool:
        """Every record read ended in exactly one place."""
        return self.read == self.embedded + self.dead_lettered

    @property
    def passed(self) -> bool:
        return self.reconciled and self.error_rate <= self.max_error_rate

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "reconciled": self.reconciled, "passed": self.passed}

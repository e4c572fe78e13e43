"""The run report (`_run_report.json` in a job's output folder): what a run read, wrote and dead-lettered."""

from __future__ import annotations

import dataclasses
from typing import ClassVar


@dataclasses.dataclass
class RunReport:
    """Common to the row-in, row-out jobs; a subclass names what a row of its main output is (embedded, ...)."""

    OUTPUT_NAME: ClassVar[str]  # the JSON key and console label of the main output's row count
    OUTPUT_COUNTER: ClassVar[str]  # the Beam counter (namespace "hubembed") that counts those rows
    EXTRA_COUNTERS: ClassVar[dict[str, str]] = {}  # more report fields: field name → counter name

    job: str
    read: int
    dead_lettered: int
    dead_lettered_by_reason: dict[str, int]
    seconds: float
    rows_per_second: float
    error_rate: float
    max_error_rate: float
    outputs: dict[str, str]
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def output_rows(self) -> int:
        return getattr(self, self.OUTPUT_NAME)

    @property
    def reconciled(self) -> bool:
        """Every record read ended in exactly one place."""
        return self.read == self.output_rows + self.dead_lettered

    @property
    def passed(self) -> bool:
        # From the counts, not the rounded `error_rate`: --max_error_rate 0 must fail on 1 letter in 3,000,000.
        exceeded = self.read > 0 and self.dead_lettered / self.read > self.max_error_rate
        return self.reconciled and not exceeded

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "reconciled": self.reconciled, "passed": self.passed}


@dataclasses.dataclass
class EmbedRunReport(RunReport):
    """The embedding job's report: `read == embedded + dead_lettered`."""

    OUTPUT_NAME: ClassVar[str] = "embedded"
    OUTPUT_COUNTER: ClassVar[str] = "records_embedded"
    # Report fields read from other counters of the "hubembed" namespace.
    EXTRA_COUNTERS: ClassVar[dict[str, str]] = {"reused": "records_reused", "resumed": "records_resumed"}

    embedded: int = 0  # rows written: embedded by the encoders in this run, or copied from stored vectors
    reused: int = 0  # of them, copied from --reuse outputs
    resumed: int = 0  # of them, copied from this output's checkpoints (the batches a killed run had finished)

    @property
    def embedded_fresh(self) -> int:
        return self.embedded - self.reused - self.resumed

    @property
    def reused_share(self) -> float:
        return round((self.reused + self.resumed) / self.embedded, 6) if self.embedded else 0.0

    def to_dict(self) -> dict:
        return {**super().to_dict(), "embedded_fresh": self.embedded_fresh, "reused_share": self.reused_share}

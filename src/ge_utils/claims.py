"""Claim verdicts: each notebook ends by checking the paper's claims on this run's numbers.

Two kinds are kept apart. *Guaranteed* claims are identities of the math and must hold at every
profile; *empirical* ones depend on the model, optimizer and scale and are reported with their
numbers. A verdict line reads::

    [guaranteed] HOLDS: <claim> (<evidence>)
    [empirical] DOES NOT HOLD: <claim> (<evidence>)

The runner collects these lines from the cell tagged ``claims`` into the run's results file.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal

Kind = Literal["guaranteed", "empirical"]
VERDICT_LINE = re.compile(
    r"^\[(?P<kind>guaranteed|empirical)\] (?P<verdict>HOLDS|DOES NOT HOLD): "
    r"(?P<claim>.*) \((?P<evidence>[^()]*)\)$"
)


@dataclass
class Claim:
    kind: Kind
    claim: str
    holds: bool
    evidence: str

    def line(self) -> str:
        verdict = "HOLDS" if self.holds else "DOES NOT HOLD"
        return f"[{self.kind}] {verdict}: {self.claim} ({self.evidence})"


@dataclass
class ClaimReport:
    """Collects claims; ``print(report)`` shows one verdict line per claim."""

    claims: list[Claim] = field(default_factory=list)

    def check(self, kind: Kind, claim: str, holds: bool, evidence: str) -> bool:
        """Record a claim; ``evidence`` (the numbers) may not contain parentheses."""
        if kind not in ("guaranteed", "empirical"):
            raise ValueError(f"kind must be 'guaranteed' or 'empirical', got {kind!r}")
        if "(" in evidence or ")" in evidence:
            raise ValueError(f"evidence may not contain parentheses: {evidence!r}")
        self.claims.append(Claim(kind, claim, bool(holds), evidence))
        return bool(holds)

    def guaranteed(self, claim: str, holds: bool, evidence: str) -> bool:
        return self.check("guaranteed", claim, holds, evidence)

    def empirical(self, claim: str, holds: bool, evidence: str) -> bool:
        return self.check("empirical", claim, holds, evidence)

    @property
    def all_guaranteed_hold(self) -> bool:
        return all(c.holds for c in self.claims if c.kind == "guaranteed")

    def __str__(self) -> str:
        return "\n".join(c.line() for c in self.claims)

    def to_records(self) -> list[dict]:
        return [asdict(c) for c in self.claims]


def parse_verdicts(text: str) -> list[dict]:
    """Claims (as dicts) from verdict lines in ``text``; other lines are ignored."""
    out = []
    for line in text.splitlines():
        m = VERDICT_LINE.match(line.strip())
        if m:
            out.append(
                {
                    "kind": m["kind"],
                    "claim": m["claim"],
                    "holds": m["verdict"] == "HOLDS",
                    "evidence": m["evidence"],
                }
            )
    return out

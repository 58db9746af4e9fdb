"""Fault injection for ``relay sink``: which replies fail, and how.

A fault is given as ``STAGE:KIND=PROBABILITY``: STAGE is ``connect`` (the
greeting), ``mail``, ``rcpt`` or ``data`` (the reply to end of data, or to
``BDAT ... LAST``); KIND is ``4xx`` (a temporary failure), ``5xx`` (a
permanent one) or ``drop`` (close the connection instead of replying).
At each reply of a stage the sink draws one number from a seeded generator
and picks drop, 4xx, 5xx or the normal reply with the configured
probabilities.  So with the same seed and the same client traffic, the same
replies fail.  The probabilities of one stage must add up to at most 1.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

STAGES: tuple[str, ...] = ("connect", "mail", "rcpt", "data")
KINDS: tuple[str, ...] = ("4xx", "5xx", "drop")

# Injected replies.  Each text marks the failure as injected, so a log of the
# MTA under test cannot be mistaken for a real problem of the sink.
REPLIES: dict[tuple[str, str], bytes] = {
    ("connect", "4xx"): b"421 4.3.2 Service not available (injected fault)\r\n",
    ("connect", "5xx"): b"554 5.3.2 No SMTP service here (injected fault)\r\n",
    ("mail", "4xx"): b"451 4.3.0 Temporary failure (injected fault)\r\n",
    ("mail", "5xx"): b"550 5.7.1 Sender rejected (injected fault)\r\n",
    ("rcpt", "4xx"): b"450 4.2.1 Mailbox temporarily unavailable (injected fault)\r\n",
    ("rcpt", "5xx"): b"550 5.1.1 Mailbox unavailable (injected fault)\r\n",
    ("data", "4xx"): b"451 4.3.0 Message not accepted for now (injected fault)\r\n",
    ("data", "5xx"): b"554 5.3.0 Message rejected (injected fault)\r\n",
}

_SPEC_RE = re.compile(r"^(connect|mail|rcpt|data):(4xx|5xx|drop)=([0-9]*\.?[0-9]+)$")


def parse_fault(spec: str) -> tuple[str, str, float]:
    """Parse ``STAGE:KIND=PROBABILITY``; raise ValueError naming the expected form."""
    match = _SPEC_RE.match(spec.strip().lower())
    if match is None:
        raise ValueError(
            f"invalid fault {spec!r}: expected STAGE:KIND=PROBABILITY with STAGE one of "
            f"{', '.join(STAGES)} and KIND one of {', '.join(KINDS)}, such as rcpt:4xx=0.1"
        )
    probability = float(match.group(3))
    if probability > 1.0:
        raise ValueError(f"invalid fault {spec!r}: probability {probability} is above 1")
    return match.group(1), match.group(2), probability


@dataclass(frozen=True)
class FaultPlan:
    """Per-stage probabilities of drop, 4xx and 5xx."""

    probabilities: dict[str, dict[str, float]]
    seed: int | None = None

    @classmethod
    def from_specs(cls, specs: list[str], seed: int | None = None) -> FaultPlan:
        """Build a plan from ``STAGE:KIND=P`` strings; a later spec for the same pair wins."""
        probabilities: dict[str, dict[str, float]] = {}
        for spec in specs:
            stage, kind, probability = parse_fault(spec)
            probabilities.setdefault(stage, {})[kind] = probability
        for stage, kinds in probabilities.items():
            total = sum(kinds.values())
            if total > 1.0 + 1e-9:
                raise ValueError(f"fault probabilities for {stage} add up to {total:g}; at most 1 is possible")
        return cls(probabilities, seed)

    def active(self, stage: str) -> bool:
        """Return True when any fault is configured for the stage."""
        return any(self.probabilities.get(stage, {}).values())

    def chooser(self, worker: int = 0) -> FaultChooser:
        """Return the random draw for one worker process (seed + worker index)."""
        seed = None if self.seed is None else self.seed + worker
        return FaultChooser(self, random.Random(seed))


class FaultChooser:
    """Draws the outcome of each faultable reply."""

    __slots__ = ("_random", "_thresholds")

    def __init__(self, plan: FaultPlan, generator: random.Random) -> None:
        self._random = generator
        # Cumulative thresholds in the fixed order drop, 4xx, 5xx.
        self._thresholds: dict[str, tuple[float, float, float]] = {}
        for stage in STAGES:
            kinds = plan.probabilities.get(stage, {})
            drop = kinds.get("drop", 0.0)
            temporary = drop + kinds.get("4xx", 0.0)
            permanent = temporary + kinds.get("5xx", 0.0)
            if permanent > 0:
                self._thresholds[stage] = (drop, temporary, permanent)

    def choose(self, stage: str) -> str | None:
        """Return ``"drop"``, ``"4xx"``, ``"5xx"`` or None (reply normally)."""
        thresholds = self._thresholds.get(stage)
        if thresholds is None:
            return None
        draw = self._random.random()
        if draw < thresholds[0]:
            return "drop"
        if draw < thresholds[1]:
            return "4xx"
        if draw < thresholds[2]:
            return "5xx"
        return None

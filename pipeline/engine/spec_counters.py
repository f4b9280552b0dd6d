"""vLLM's speculative-decoding counters, read offline (``LLM.get_metrics()``) or from a server.

Mean acceptance length = 1 + accepted / drafts; per-position rate = accepted_at_pos / drafts.
The counters are cumulative: a measurement is the difference of two snapshots.
"""

from __future__ import annotations

import dataclasses
import urllib.request
from dataclasses import dataclass
from typing import Any

SPEC_PREFIX = "vllm:spec_decode_"


@dataclass
class SpecCounters:
    """vLLM's cumulative spec-decode counters (summed over engines/labels)."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    accepted_per_pos: list[int] = dataclasses.field(default_factory=list)

    def __sub__(self, before: SpecCounters) -> SpecCounters:
        pos = [a - (before.accepted_per_pos[i] if i < len(before.accepted_per_pos) else 0)
               for i, a in enumerate(self.accepted_per_pos)]
        return SpecCounters(self.drafts - before.drafts, self.draft_tokens - before.draft_tokens,
                            self.accepted - before.accepted, pos)

    def _add(self, name: str, value: float, position: str | None) -> None:
        key = name.removeprefix(SPEC_PREFIX).removesuffix("_total")
        if key == "num_accepted_tokens_per_pos" and position is not None:
            i = int(position)
            self.accepted_per_pos += [0] * (i + 1 - len(self.accepted_per_pos))
            self.accepted_per_pos[i] += int(value)
        elif key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            field = {"num_drafts": "drafts", "num_draft_tokens": "draft_tokens", "num_accepted_tokens": "accepted"}[key]
            setattr(self, field, getattr(self, field) + int(value))

    @classmethod
    def from_snapshot(cls, metrics: list[Any]) -> SpecCounters:
        """From ``LLM.get_metrics()`` (Counter / Vector objects)."""
        out = cls()
        for m in metrics:
            if not m.name.startswith(SPEC_PREFIX):
                continue
            if hasattr(m, "values"):  # the per-position Vector
                for i, v in enumerate(m.values):
                    out._add(m.name, v, str(i))
            elif hasattr(m, "value"):
                out._add(m.name, m.value, None)
        return out

    @classmethod
    def from_prometheus(cls, text: str) -> SpecCounters:
        """From a server's ``/metrics`` page."""
        from prometheus_client.parser import text_string_to_metric_families

        out = cls()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith(SPEC_PREFIX) and s.name.endswith("_total"):
                    out._add(s.name, s.value, s.labels.get("position"))
        return out

    def summary(self, k: int) -> dict[str, Any]:
        drafts = max(self.drafts, 1)
        pos = (self.accepted_per_pos + [0] * k)[:k]
        return {"mean_acceptance_length": 1 + self.accepted / drafts if self.drafts else None,
                "per_position_acceptance_rate": [p / drafts for p in pos] if self.drafts else None,
                "draft_acceptance_rate": self.accepted / self.draft_tokens if self.draft_tokens else None,
                "num_drafts": self.drafts, "num_draft_tokens": self.draft_tokens, "num_accepted_tokens": self.accepted}


def scrape_spec(url: str, timeout_s: float = 30.0) -> SpecCounters:
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout_s) as resp:
        return SpecCounters.from_prometheus(resp.read().decode("utf-8"))

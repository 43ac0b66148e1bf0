"""Server metrics in the Prometheus text format (no client library: a few counters and two histograms).

Held by the app (no global state): requests by endpoint and status, prompt and completion tokens, request
latency and time to first token, routing choices per adapter ("none" = the base model), and the engine's
gauges (queue length, running sequences, ...).
"""

from __future__ import annotations

from collections import Counter

__all__ = ["Metrics"]

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PREFIX = "adaptermix_"


class Histogram:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.total, self.count = 0.0, 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
        self.total += seconds
        self.count += 1

    def lines(self, name: str) -> list[str]:
        rows = [f'{name}_bucket{{le="{bound}"}} {n}' for bound, n in zip(BUCKETS, self.counts)]
        return rows + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}",
                       f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self.requests: Counter = Counter()        # (endpoint, status) -> n
        self.tokens: Counter = Counter()          # "prompt" / "completion" -> n
        self.routing: Counter = Counter()         # adapter (or "none") -> n
        self.latency, self.ttft = Histogram(), Histogram()

    def request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def finished(self, *, prompt_tokens: int, completion_tokens: int, latency: float, ttft: float | None) -> None:
        self.tokens["prompt"] += prompt_tokens
        self.tokens["completion"] += completion_tokens
        self.latency.observe(latency)
        if ttft is not None:
            self.ttft.observe(ttft)

    def routed(self, adapters: tuple[str, ...]) -> None:
        for adapter in adapters or ("none",):
            self.routing[adapter] += 1

    def render(self, engine_gauges: dict[str, float]) -> str:
        lines = [f"# TYPE {PREFIX}requests_total counter"]
        lines += [f'{PREFIX}requests_total{{endpoint="{e}",status="{s}"}} {n}'
                  for (e, s), n in sorted(self.requests.items())]
        lines += [f"# TYPE {PREFIX}tokens_total counter"]
        lines += [f'{PREFIX}tokens_total{{kind="{kind}"}} {self.tokens[kind]}' for kind in ("prompt", "completion")]
        lines += [f"# TYPE {PREFIX}routing_choices_total counter"]
        lines += [f'{PREFIX}routing_choices_total{{adapter="{a}"}} {n}' for a, n in sorted(self.routing.items())]
        lines += [f"# TYPE {PREFIX}request_latency_seconds histogram",
                  *self.latency.lines(f"{PREFIX}request_latency_seconds"),
                  f"# TYPE {PREFIX}time_to_first_token_seconds histogram",
                  *self.ttft.lines(f"{PREFIX}time_to_first_token_seconds")]
        for name, value in sorted(engine_gauges.items()):
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# TYPE {PREFIX}engine_{name} {kind}", f"{PREFIX}engine_{name} {value}"]
        return "\n".join(lines) + "\n"

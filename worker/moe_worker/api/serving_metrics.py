"""The serving metrics of the OpenAI app, under vLLM's names (the de facto convention that the
Gateway API Inference Extension's endpoint picker, KEDA, Dynamo's planner and the vLLM Grafana
dashboards read), each labelled `model_name`, on the API port's `/metrics`.

    vllm:num_requests_running            gauge      sequences admitted and not finished
    vllm:num_requests_waiting            gauge      requests waiting for a KV cache budget
    vllm:kv_cache_usage_perc             gauge      fraction (0..1) of KV blocks reserved
    vllm:time_to_first_token_seconds     histogram  arrival at the API to the first token
    vllm:inter_token_latency_seconds     histogram  between two tokens of a choice
    vllm:e2e_request_latency_seconds     histogram  arrival to the last token
    vllm:request_queue_time_seconds      histogram  arrival at the scheduler to admission
    vllm:prompt_tokens_total             counter    prompt tokens prefilled
    vllm:generation_tokens_total         counter    tokens generated
    vllm:request_success_total           counter    choices finished, by `finished_reason`

Counted per choice (an engine sequence, as vLLM counts a request's prompts and `n`). The gauges
are read from the backend at scrape time (`Backend.load`); the rest are observed by
`Generation` as events reach the API. The workers' `moe_*` metrics stay on the control port.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from moe_worker.serving.generation import Backend

LABEL = "model_name"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
TTFT_BUCKETS += (7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
ITL_BUCKETS += (7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0)
REQUEST_BUCKETS += (60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _Load(Collector):
    """The backend's running, waiting and KV figures, read at scrape time."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def collect(self) -> Iterator[Metric]:
        load, name = self.backend.load(), self.backend.card.name
        for metric, help_text, value in (
            ("vllm:num_requests_running", "Sequences admitted and not finished.", load.running),
            ("vllm:num_requests_waiting", "Requests waiting for a KV cache budget.", load.waiting),
            (
                "vllm:kv_cache_usage_perc",
                "Fraction of the group's KV cache blocks reserved (1 = full).",
                load.kv_cache_usage,
            ),
        ):
            family = GaugeMetricFamily(metric, help_text, labels=[LABEL])
            family.add_metric([name], value)
            yield family


class ServingMetrics:
    """The registry, and the `completions.Observer` every generation reports to."""

    def __init__(self, backend: Backend) -> None:
        self.registry = r = CollectorRegistry()
        r.register(_Load(backend))
        self.model = backend.card.name
        labels = [LABEL]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Seconds from a request's arrival to its first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Seconds between two tokens of a choice.",
            labels,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Seconds from a request's arrival to its end.",
            labels,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "vllm:request_queue_time_seconds",
            "Seconds a request waited for a KV cache budget before it was admitted.",
            labels,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens prefilled.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated.", labels, registry=r
        )
        self.success = Counter(
            "vllm:request_success",
            "Choices finished, by finish reason.",
            [LABEL, "finished_reason"],
            registry=r,
        )

    # ------------------------------------------------------------ completions.Observer

    def first_token(self, seconds: float, queued: float | None, prompt_tokens: int) -> None:
        self.ttft.labels(self.model).observe(seconds)
        if queued is not None:
            self.queue.labels(self.model).observe(queued)
        self.prompt_tokens.labels(self.model).inc(prompt_tokens)

    def tokens(self, count: int, gap: float | None) -> None:
        """`count` tokens came `gap` seconds after the choice's previous ones (None: its
        first tokens, which have no inter-token latency)."""
        if gap is not None:
            for _ in range(count):
                self.itl.labels(self.model).observe(gap / count)
        self.generation_tokens.labels(self.model).inc(count)

    def finished(self, reason: str, seconds: float) -> None:
        self.e2e.labels(self.model).observe(seconds)
        self.success.labels(self.model, reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus collectors for one server, in their own CollectorRegistry (no module-global state).

Names follow vLLM's (prefix `depthserve:`). Gauges and engine counters are read at scrape time from
the latest `EngineStats` snapshot, which the engine thread takes after each step, so a scrape never
touches the engine. Latency histograms and finish reasons are observed where outputs are delivered
(AsyncLLMEngine calls the RequestObserver methods below).

A server with several models has one engine each and one registry for all: every series carries vLLM's
`model_name` label, one value per model (`ServerMetrics.add_model` gives the next engine its observer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.llm_engine import EngineStats

PREFIX = "depthserve:"
FINISH_REASONS = ("stop", "length", "abort", "error")

# vLLM's buckets, extended downwards: a small model on CPU decodes in milliseconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineStatsCollector(Collector):
    """Gauges and monotonic counters straight from the latest engine snapshots, one series per model."""

    def __init__(self) -> None:
        self.models: list[tuple[str, Callable[[], EngineStats | None]]] = []

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for name, stats in self.models:
            for m in self._collect_one(name, stats()):
                if m.name in families:
                    families[m.name].samples.extend(m.samples)
                else:
                    families[m.name] = m
        yield from families.values()

    @staticmethod
    def _collect_one(model: str, s: EngineStats | None) -> Iterator[Metric]:
        labels = ["model_name"]
        values = [model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        def get(field: str) -> float:
            return float(getattr(s, field)) if s is not None else 0.0

        yield gauge("num_requests_running", "Requests in the running batch.", get("num_running"))
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", get("num_waiting"))
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache blocks held by requests (0-1).",
                    get("kv_cache_usage"))
        yield gauge("kv_cache_blocks_held", "KV cache blocks referenced by live requests.", get("kv_blocks_held"))
        yield gauge("depth_cache_usage_perc", "Fraction of the AttnRes depth pool used by the last step (0-1).",
                    get("depth_cache_usage"))
        yield gauge("depth_cache_bytes", "Bytes preallocated for the AttnRes depth pool.", get("depth_cache_bytes"))
        yield gauge("depth_cache_rows_in_use", "Depth pool rows reserved outside a step (a leak unless 0).",
                    get("depth_rows_in_use"))
        yield counter("prompt_tokens", "Prefill tokens processed.", get("prompt_tokens"))
        yield counter("generation_tokens", "Tokens generated.", get("generation_tokens"))
        yield counter("num_preemptions", "Requests preempted for lack of KV cache.", get("num_preemptions"))
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      get("prefix_cache_queries"))
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", get("prefix_cache_hits"))
        depth = s.depth if s is not None else None
        if depth is not None:  # only with --depth-metrics: one series per (site, source)
            w = GaugeMetricFamily(PREFIX + "depth_attention_weight",
                                  "Mean AttnRes depth weight of a site on a source, over sampled tokens.",
                                  labels=["model_name", "site", "source"])
            for i, site in enumerate(depth.mean_weight):
                for j, v in enumerate(site):
                    w.add_metric([model, str(i), str(j)], v)
            yield w
            e = GaugeMetricFamily(PREFIX + "depth_attention_entropy",
                                  "Mean entropy (nats) of a site's AttnRes depth weights, over sampled tokens.",
                                  labels=["model_name", "site"])
            for i, v in enumerate(depth.mean_entropy):
                e.add_metric([model, str(i)], v)
            yield e
            yield counter("depth_attention_tokens", "Sampled tokens whose depth weights are aggregated.",
                          float(depth.tokens))


class ServerMetrics:
    """All collectors of one server; the RequestObserver of its first model's engine (`add_model` for more)."""

    def __init__(self, stats: Callable[[], EngineStats | None], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)

        self.ttft = hist("time_to_first_token_seconds", "Time from arrival to the first token.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                        ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Time from arrival to the end of a request.", E2E_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Time from arrival to first scheduling.",
                               TTFT_BUCKETS)
        self.success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=self.registry)
        self._engines = _EngineStatsCollector()
        self.registry.register(self._engines)
        self._add_series(model_name, stats)
        self._first = ModelObserver(self, model_name)

    def _add_series(self, model_name: str, stats: Callable[[], EngineStats | None]) -> None:
        if any(name == model_name for name, _ in self._engines.models):
            raise ValueError(f"model_name {model_name!r} is already in the metrics")
        for h in (self.ttft, self.itl, self.e2e, self.queue_time):  # export zeros from the start, so
            h.labels(model_name)  # dashboards and rate() see every series before the first request
        for reason in FINISH_REASONS:
            self.success.labels(model_name, reason)
        self._engines.models.append((model_name, stats))

    def add_model(self, stats: Callable[[], EngineStats | None], model_name: str) -> ModelObserver:
        """Series for another model's engine, in this registry; returns that engine's observer."""
        self._add_series(model_name, stats)
        return ModelObserver(self, model_name)

    # ---- RequestObserver (of the first model) -------------------------------------------------------
    def observe_queue_time(self, seconds: float) -> None:
        self._first.observe_queue_time(seconds)

    def observe_first_token(self, seconds: float) -> None:
        self._first.observe_first_token(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self._first.observe_inter_token(seconds)

    def observe_finished(self, finish_reason: str, e2e_seconds: float) -> None:
        self._first.observe_finished(finish_reason, e2e_seconds)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ModelObserver:
    """One model's RequestObserver: observes into the server's histograms under its `model_name`."""

    def __init__(self, metrics: ServerMetrics, model_name: str) -> None:
        self.m = metrics
        self.model_name = model_name

    def observe_queue_time(self, seconds: float) -> None:
        self.m.queue_time.labels(self.model_name).observe(max(seconds, 0.0))

    def observe_first_token(self, seconds: float) -> None:
        self.m.ttft.labels(self.model_name).observe(max(seconds, 0.0))

    def observe_inter_token(self, seconds: float) -> None:
        self.m.itl.labels(self.model_name).observe(max(seconds, 0.0))

    def observe_finished(self, finish_reason: str, e2e_seconds: float) -> None:
        reason = finish_reason if finish_reason in FINISH_REASONS else "error"
        self.m.success.labels(self.model_name, reason).inc()
        self.m.e2e.labels(self.model_name).observe(max(e2e_seconds, 0.0))

"""Prometheus collectors for one server, in their own CollectorRegistry (no module-global state).

Names and buckets follow vLLM's (prefix `depthserve:` for `vllm:`), so a dashboard built for vLLM works
with the prefix changed (grafana/depthserve.json is one). Gauges and engine counters are read at scrape
time from the latest `EngineStats` snapshot, which the engine thread takes after each step, so a scrape
never touches the engine. Histograms and finish reasons are observed where outputs are delivered
(AsyncLLMEngine calls the RequestObserver methods below). No `_created` series: vLLM's dashboards do not
use them and they double the exposition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.async_engine import FinishedRequestStats
from engine.depth_stats import site_labels, source_label
from engine.llm_engine import EngineStats

PREFIX = "depthserve:"
FINISH_REASONS = ("stop", "length", "abort", "error")

# vLLM's buckets (every vLLM boundary is here), extended downwards: a small model on CPU decodes in milliseconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TPOT_BUCKETS = ITL_BUCKETS  # vLLM observes the same per-token latencies into both
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def buckets_1_2_5(limit: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's request token-count buckets, to max_model_len)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


class _EngineStatsCollector(Collector):
    """Gauges and monotonic counters straight from the latest engine snapshot."""

    def __init__(self, stats: Callable[[], EngineStats | None], model_name: str) -> None:
        self._stats = stats
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        labels = ["model_name"]
        values = [self._model]

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
            sites = site_labels(len(depth.mean_weight))  # the names `depthserve inspect` plots use
            for i, site in enumerate(depth.mean_weight):
                for j, v in enumerate(site):
                    w.add_metric([self._model, sites[i], source_label(j)], v)
            yield w
            e = GaugeMetricFamily(PREFIX + "depth_attention_entropy",
                                  "Mean entropy (nats) of a site's AttnRes depth weights, over sampled tokens.",
                                  labels=["model_name", "site"])
            for i, v in enumerate(depth.mean_entropy):
                e.add_metric([self._model, sites[i]], v)
            yield e
            yield counter("depth_attention_tokens", "Sampled tokens whose depth weights are aggregated.",
                          float(depth.tokens))


class ServerMetrics:
    """All collectors of one server; implements AsyncLLMEngine's RequestObserver."""

    def __init__(self, stats: Callable[[], EngineStats | None], model_name: str, max_model_len: int = 2048,
                 cache_info: Mapping[str, object] | None = None) -> None:
        disable_created_metrics()  # process-wide in prometheus_client; every depthserve registry wants it
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
                               E2E_BUCKETS)
        self.tpot = hist("time_per_output_token_seconds", "Time per output token (as inter_token_latency).",
                         TPOT_BUCKETS)
        self.prefill_time = hist("request_prefill_time_seconds", "Time from first scheduling to the first token.",
                                 E2E_BUCKETS)
        self.decode_time = hist("request_decode_time_seconds", "Time from the first token to the last.",
                                E2E_BUCKETS)
        self.inference_time = hist("request_inference_time_seconds", "Time from first scheduling to the last "
                                   "token.", E2E_BUCKETS)
        token_buckets = buckets_1_2_5(max_model_len)
        self.prompt_tokens = hist("request_prompt_tokens", "Prompt tokens of a finished request.", token_buckets)
        self.generation_tokens = hist("request_generation_tokens", "Tokens generated for a finished request "
                                      "(all its samples).", token_buckets)
        self.max_generation_tokens = hist("request_max_num_generation_tokens", "Tokens generated by the longest "
                                          "sample of a finished request.", token_buckets)
        self.iteration_tokens = hist("iteration_tokens_total", "Tokens (prompt and generated) per engine step.",
                                     ITERATION_TOKENS_BUCKETS)
        if cache_info is not None:
            info = Gauge(PREFIX + "cache_config_info", "Information of the cache configuration (value 1).",
                         sorted(cache_info), registry=self.registry)
            info.labels(**{k: str(v) for k, v in cache_info.items()}).set(1)
        self.success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=self.registry)
        for h in (self.ttft, self.itl, self.e2e, self.queue_time, self.tpot, self.prefill_time, self.decode_time,
                  self.inference_time, self.prompt_tokens, self.generation_tokens, self.max_generation_tokens,
                  self.iteration_tokens):  # export zeros from the start, so
            h.labels(model_name)  # dashboards and rate() see every series before the first request
        for reason in FINISH_REASONS:
            self.success.labels(model_name, reason)
        self.registry.register(_EngineStatsCollector(stats, model_name))

    # ---- RequestObserver ---------------------------------------------------------------------------
    def observe_queue_time(self, seconds: float) -> None:
        self.queue_time.labels(self.model_name).observe(max(seconds, 0.0))

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(max(seconds, 0.0))

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.labels(self.model_name).observe(max(seconds, 0.0))
        self.tpot.labels(self.model_name).observe(max(seconds, 0.0))

    def observe_request(self, stats: FinishedRequestStats) -> None:
        m = self.model_name
        self.prompt_tokens.labels(m).observe(stats.prompt_tokens)
        self.generation_tokens.labels(m).observe(stats.generation_tokens)
        self.max_generation_tokens.labels(m).observe(stats.max_sample_tokens)
        for hist, seconds in ((self.prefill_time, stats.prefill_seconds), (self.decode_time, stats.decode_seconds),
                              (self.inference_time, stats.inference_seconds)):
            if seconds is not None:
                hist.labels(m).observe(max(seconds, 0.0))

    def observe_iteration_tokens(self, tokens: int) -> None:
        self.iteration_tokens.labels(self.model_name).observe(tokens)

    def observe_finished(self, finish_reason: str, e2e_seconds: float) -> None:
        reason = finish_reason if finish_reason in FINISH_REASONS else "error"
        self.success.labels(self.model_name, reason).inc()
        self.e2e.labels(self.model_name).observe(max(e2e_seconds, 0.0))

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

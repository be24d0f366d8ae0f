"""Prometheus collectors for one server, in their own CollectorRegistry (no module-global state).

Names and buckets follow vLLM's (prefix `depthserve:` for `vllm:`), so a dashboard built for vLLM works
with the prefix changed (grafana/depthserve.json is one). Gauges and engine counters are read at scrape
time from the latest `EngineStats` snapshot, which the engine thread takes after each step, so a scrape
never touches the engine. Histograms and finish reasons are observed where outputs are delivered
(AsyncLLMEngine calls the RequestObserver methods below). No `_created` series: vLLM's dashboards do not
use them and they double the exposition.

A server with several models has one engine each and one registry for all: every series carries vLLM's
`model_name` label, one value per model (`ServerMetrics.add_model` gives the next engine its observer).
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
        yield counter("spec_decode_num_drafts", "Speculative steps: requests' steps that verified drafts.",
                      get("spec_decode_num_drafts"))
        yield counter("spec_decode_num_draft_tokens", "Drafted tokens verified.", get("spec_decode_num_draft_tokens"))
        yield counter("spec_decode_num_accepted_tokens", "Drafted tokens accepted.",
                      get("spec_decode_num_accepted_tokens"))
        per_pos = s.spec_decode_num_accepted_tokens_per_pos if s is not None else ()
        if per_pos:
            c = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                    "Drafted tokens accepted, by position in the draft.",
                                    labels=["model_name", "position"])
            for pos, v in enumerate(per_pos):
                c.add_metric([model, str(pos)], float(v))
            yield c
        depth = s.depth if s is not None else None
        if depth is not None:  # only with --depth-metrics: one series per (site, source)
            w = GaugeMetricFamily(PREFIX + "depth_attention_weight",
                                  "Mean AttnRes depth weight of a site on a source, over sampled tokens.",
                                  labels=["model_name", "site", "source"])
            sites = site_labels(len(depth.mean_weight))  # the names `depthserve inspect` plots use
            for i, site in enumerate(depth.mean_weight):
                for j, v in enumerate(site):
                    w.add_metric([model, sites[i], source_label(j)], v)
            yield w
            e = GaugeMetricFamily(PREFIX + "depth_attention_entropy",
                                  "Mean entropy (nats) of a site's AttnRes depth weights, over sampled tokens.",
                                  labels=["model_name", "site"])
            for i, v in enumerate(depth.mean_entropy):
                e.add_metric([model, sites[i]], v)
            yield e
            yield counter("depth_attention_tokens", "Sampled tokens whose depth weights are aggregated.",
                          float(depth.tokens))


class ServerMetrics:
    """All collectors of one server; the RequestObserver of its first model's engine (`add_model` for more).

    `max_model_len`: the request-token histograms' buckets go up to it (with several models: the longest).
    `cache_info`: the labels of the model's cache_config_info series (None: no series)."""

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
        self.histograms = (self.ttft, self.itl, self.e2e, self.queue_time, self.tpot, self.prefill_time,
                           self.decode_time, self.inference_time, self.prompt_tokens, self.generation_tokens,
                           self.max_generation_tokens, self.iteration_tokens)
        self.cache_config_info: Gauge | None = None  # made with the first cache_info given
        self._cache_info_keys: list[str] = []
        self.success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=self.registry)
        self._engines = _EngineStatsCollector()
        self.registry.register(self._engines)
        self._add_series(model_name, stats, cache_info)
        self._first = ModelObserver(self, model_name)

    def _add_series(self, model_name: str, stats: Callable[[], EngineStats | None],
                    cache_info: Mapping[str, object] | None) -> None:
        if any(name == model_name for name, _ in self._engines.models):
            raise ValueError(f"model_name {model_name!r} is already in the metrics")
        for h in self.histograms:  # export zeros from the start, so
            h.labels(model_name)  # dashboards and rate() see every series before the first request
        for reason in FINISH_REASONS:
            self.success.labels(model_name, reason)
        if cache_info is not None:
            keys = sorted(cache_info)
            if self.cache_config_info is None:
                self.cache_config_info = Gauge(PREFIX + "cache_config_info",
                                               "Information of the cache configuration (value 1).",
                                               ["model_name", *keys], registry=self.registry)
                self._cache_info_keys = keys
            elif keys != self._cache_info_keys:
                raise ValueError(f"cache_info of {model_name!r} has other labels ({keys}) than the first model's")
            self.cache_config_info.labels(model_name=model_name, **{k: str(v) for k, v in cache_info.items()}).set(1)
        self._engines.models.append((model_name, stats))

    def add_model(self, stats: Callable[[], EngineStats | None], model_name: str,
                  cache_info: Mapping[str, object] | None = None) -> ModelObserver:
        """Series for another model's engine, in this registry; returns that engine's observer. The histograms'
        buckets are this registry's (up to the max_model_len it was made with: build_app passes the longest)."""
        self._add_series(model_name, stats, cache_info)
        return ModelObserver(self, model_name)

    # ---- RequestObserver (of the first model) -------------------------------------------------------
    def observe_queue_time(self, seconds: float) -> None:
        self._first.observe_queue_time(seconds)

    def observe_first_token(self, seconds: float) -> None:
        self._first.observe_first_token(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self._first.observe_inter_token(seconds)

    def observe_request(self, stats: FinishedRequestStats) -> None:
        self._first.observe_request(stats)

    def observe_iteration_tokens(self, tokens: int) -> None:
        self._first.observe_iteration_tokens(tokens)

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
        self.m.tpot.labels(self.model_name).observe(max(seconds, 0.0))

    def observe_request(self, stats: FinishedRequestStats) -> None:
        m, n = self.m, self.model_name
        m.prompt_tokens.labels(n).observe(stats.prompt_tokens)
        m.generation_tokens.labels(n).observe(stats.generation_tokens)
        m.max_generation_tokens.labels(n).observe(stats.max_sample_tokens)
        for hist, seconds in ((m.prefill_time, stats.prefill_seconds), (m.decode_time, stats.decode_seconds),
                              (m.inference_time, stats.inference_seconds)):
            if seconds is not None:
                hist.labels(n).observe(max(seconds, 0.0))

    def observe_iteration_tokens(self, tokens: int) -> None:
        self.m.iteration_tokens.labels(self.model_name).observe(tokens)

    def observe_finished(self, finish_reason: str, e2e_seconds: float) -> None:
        reason = finish_reason if finish_reason in FINISH_REASONS else "error"
        self.m.success.labels(self.model_name, reason).inc()
        self.m.e2e.labels(self.model_name).observe(max(e2e_seconds, 0.0))

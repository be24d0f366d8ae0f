"""The offline benchmarks run end to end on tiny shapes and write their JSON (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import bench_latency, bench_throughput

TINY = ["--layers", "2", "--hidden", "64", "--ffn", "128", "--heads", "4", "--kv-heads", "2", "--vocab", "256"]


def test_bench_latency_writes_pairs(tmp_path: Path) -> None:
    out = tmp_path / "lat.json"
    assert bench_latency.main([*TINY, "--blocks", "2", "--prefill", "16", "--batch", "2", "--repeats", "1",
                               "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["case"] for r in res["rows"]] == ["prefill tokens=16", "decode batch=2"]
    assert all(r["standard_ms"] > 0 and r["attnres_ms"] > 0 for r in res["rows"])
    assert res["depth_cache_bytes_per_token"] > 0


def test_bench_latency_compares_kernel_backends(tmp_path: Path) -> None:
    out = tmp_path / "kern.json"
    assert bench_latency.main([*TINY, "--blocks", "2", "--prefill", "16", "--batch", "1", "--repeats", "1",
                               "--dtype", "float32", "--kernels", "native", "reference", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["read_bandwidth_gbs"] > 0
    (run,) = res["runs"]
    assert run["config"]["resolved"]["reference"] == "reference"
    assert all(len(r["ms"]) == 4 and min(r["ms"].values()) > 0 for r in run["rows"])


def test_bench_throughput_compares_with_transformers(tmp_path: Path) -> None:
    out = tmp_path / "tp.json"
    assert bench_throughput.main([*TINY, "--num-prompts", "4", "--input-len", "4", "8", "--output-len", "4", "6",
                                  "--hf-batch", "2", "--max-num-seqs", "2", "4", "--prefill-tokens", "16",
                                  "--decode-batch", "1", "2", "--decode-steps", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["depthserve_tok_s"] > 0 and set(res["hf_tok_s"]) == {"2"}
    assert set(res["depthserve_tok_s_by_max_num_seqs"]) == {"2", "4"}
    assert res["depthserve_tok_s"] == max(res["depthserve_tok_s_by_max_num_seqs"].values())
    assert res["b1_fraction_of_roofline"] > 0 and res["decode_b32"]["step_ms"] > 0
    assert res["b1_fraction_of_read_roofline"] > 0
    assert res["prefill_vs_hf"]["tokens"] == 16 and res["prefill_vs_hf"]["hf_forward_ms"] > 0
    rate = res["decode_rate"]
    assert set(rate["depthserve_tok_s"]) == {"1", "2"} and set(rate["hf_tok_s"]) == {"2"}
    assert min(rate["depthserve_tok_s"].values()) > 0 and rate["speedup_best_vs_best"] > 0


def test_bench_ops_times_every_op(tmp_path: Path) -> None:
    from loadtest import bench_ops

    out = tmp_path / "ops.json"
    bench_ops.main(["--hidden", "67", "--ffn", "40", "--heads", "3", "1", "8", "--tokens", "1", "3",
                           "--dtype", "float32", "--reps", "1", "--min-time", "0.001", "--out", str(out)])
    assert json.loads(out.read_text())

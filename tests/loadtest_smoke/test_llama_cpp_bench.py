"""The llama.cpp comparison's parts that need no llama.cpp build: cache keys, names, parsing, tables.

The build itself (minutes of compiling) and the runs against it are not tested here; CI never compiles
llama.cpp. A test that needs the build skips when the cache has none.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from loadtest import bench, bench_llama_cpp, bench_vs_llama_server, llama_cpp

FLAGS = "processor\t: 0\nflags\t\t: sse avx2 fma avx\nbogomips\t: 4000\n"


def test_cache_root_env_and_default(tmp_path: Path) -> None:
    assert llama_cpp.cache_root({"DEPTHSERVE_LLAMA_CPP_CACHE": str(tmp_path)}) == tmp_path
    assert llama_cpp.cache_root({}) == Path.home() / ".cache" / "depthserve" / "llama_cpp"


def test_cache_key_follows_version_machine_and_cpu() -> None:
    flags = llama_cpp.cpu_flags(FLAGS)
    assert flags == "avx avx2 fma sse"  # sorted: the order /proc/cpuinfo lists them in does not matter
    key = llama_cpp.cache_key("0.3.36", "x86_64", flags)
    assert key.startswith("0.3.36-x86_64-") and len(key.rsplit("-", 1)[1]) == 8
    assert key == llama_cpp.cache_key("0.3.36", "x86_64", flags)
    assert key != llama_cpp.cache_key("0.3.35", "x86_64", flags)
    assert key != llama_cpp.cache_key("0.3.36", "aarch64", flags)
    assert key != llama_cpp.cache_key("0.3.36", "x86_64", flags + " avx512f")
    assert llama_cpp.cpu_flags("no flags here") == ""


def test_layout_markers_and_require(tmp_path: Path) -> None:
    lay = llama_cpp.Layout(tmp_path, "k")
    assert lay.dir == tmp_path / "k" and lay.python == tmp_path / "k" / "venv" / "bin" / "python"
    assert set(lay.paths()) >= {"python", "llama-server", "llama-quantize"}
    with pytest.raises(SystemExit, match="loadtest.llama_cpp build"):
        llama_cpp.require(lay)
    lay.dir.mkdir()
    for step in ("python", "binaries"):
        lay.marker(step).touch()
    assert llama_cpp.require(lay) is lay
    # every step done: build() does nothing (no download, no compile), so a second call is instant
    assert llama_cpp.build(lay) is lay


@pytest.mark.parametrize(("source", "name"), [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct-Q8_0.gguf"),
    ("model-q4_1.gguf", "model-Q8_0.gguf"),
    ("plain.gguf", "plain-Q8_0.gguf"),
])
def test_quant_name(source: str, name: str) -> None:
    assert llama_cpp.quant_name(Path(source), "Q8_0") == name


def test_llama_cpp_cli_parsing() -> None:
    with pytest.raises(SystemExit):
        llama_cpp.main([])  # a command is required


def test_bench_commands_registered() -> None:
    assert bench.COMMANDS["llamacpp"] == "loadtest.bench_llama_cpp"
    assert bench.COMMANDS["vs-llama-server"] == "loadtest.bench_vs_llama_server"
    assert set(bench.COMMANDS) == set(bench.HELP)


def test_decode_rate_and_first_difference() -> None:
    assert bench_llama_cpp.decode_rate([1.0, 1.5, 2.0, 2.5]) == pytest.approx(2.0)  # prefill (t=1) excluded
    assert math.isnan(bench_llama_cpp.decode_rate([1.0]))
    assert bench_llama_cpp.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert bench_llama_cpp.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert bench_llama_cpp.first_difference([1, 2], [1, 2, 3]) == 2


def test_llamacpp_args_and_table() -> None:
    a = bench_llama_cpp.parse_args(["x.gguf", "--tokens", "64", "--out", "o.json"])
    assert a.files == [Path("x.gguf")] and a.tokens == 64 and a.threads == 2 and a.worker is None
    check = {"prompt": "Hi | there", "first_diff": None, "llama_cpp_text": "a\nb", "depthserve_text": "a\nb"}
    result = {"read_bandwidth_gbs": {"roofline": 10.0},
              "files": [{"name": "m.gguf", "bytes": 100 * 2**20, "decode_tok_s": {"llama.cpp": 50.0,
                         "depthserve": 25.0}, "ratio": 0.5, "greedy": [check, {**check, "first_diff": 3}]}]}
    md = bench_llama_cpp.markdown(result)
    assert "| m.gguf | 100 | 50.0 | 25.0 | 0.50x | 95 | 52% | 100 | 26% |" in md
    result["files"][0]["depthserve_weight_bytes"] = 200 * 2**20  # bf16 of a file stored in 8 bits
    assert "| 95 | 52% | 200 | 52% |" in bench_llama_cpp.markdown(result)
    assert "Hi \\| there | equal | a\\nb" in md and "| 3 |" in md
    assert bench_llama_cpp.roofline_tok_s(10**9, 10.0) == pytest.approx(10.0)


def test_vs_llama_server_commands_and_table(tmp_path: Path) -> None:
    cmd = bench_vs_llama_server.llama_server_cmd(Path("/b/llama-server"), Path("m.gguf"), 9000, 8, 2, 128, 128)
    assert cmd[cmd.index("--parallel") + 1] == "8" and cmd[cmd.index("-c") + 1] == str(8 * 320)
    assert cmd[cmd.index("-t") + 1] == "2" and cmd[cmd.index("--port") + 1] == "9000"
    assert bench_vs_llama_server.llama_server_cmd(Path("s"), Path("m"), 1, 1, 2, 8, 8, ["--poll", "0"])[-2:] == [
        "--poll", "0"]
    ds = bench_vs_llama_server.depthserve_cmd(Path("m.gguf"), 9001, 32, 2, 128, 128)
    assert ds[1:4] == ["-m", "server.cli", "serve"] and "--quantization" not in ds
    assert ds[ds.index("--max-num-seqs") + 1] == "32" and ds[ds.index("--num-threads") + 1] == "2"
    assert "--quantization" in bench_vs_llama_server.depthserve_cmd(Path("m"), 1, 1, 2, 8, 8, "q8_0")
    assert bench_vs_llama_server.num_prompts_for(1) == 4 and bench_vs_llama_server.num_prompts_for(32) == 64
    a = bench_vs_llama_server.parse_args(["--builtin"])
    assert a.concurrency == [1, 8, 32] and a.input_len == 128 and a.output_len == 128

    summary = {"output_throughput": 100.0, "ttft_ms": {"p50": 40.0}, "tpot_ms": {"p50": 9.5}, "completed": 4,
               "failed": 0, "total_output_tokens": 512, "duration_s": 5.0}
    r = bench_vs_llama_server.row(summary, 512)
    assert r["exact_output"] and r["output_tok_s"] == 100.0
    assert not bench_vs_llama_server.row({**summary, "total_output_tokens": 500}, 512)["exact_output"]
    result = {"files": [{"name": "m.gguf", "runs": {"8": {"llama.cpp": r, "depthserve": {**r,
                                                                                        "output_tok_s": 50.0}}}}]}
    assert "| m.gguf | 8 | 100.0 | 50.0 | 0.50x | 40 | 40 | 9.5 | 9.5 | yes |" in bench_vs_llama_server.markdown(result)


def test_server_context_kills_a_server_that_dies(tmp_path: Path) -> None:
    import sys

    from loadtest import servers

    with pytest.raises(RuntimeError, match="exited"), servers.server(
            [sys.executable, "-c", "raise SystemExit(3)"], 1, tmp_path / "log", timeout=20):
        pass
    assert not servers._LIVE


def test_at_difference_reports_the_margin() -> None:
    tops = [[(1, -0.1), (9, -2.0)], [(5, -0.70), (6, -0.72), (7, -3.0)]]
    d = bench_llama_cpp.at_difference([1, 6], [1, 5], 1, tops)
    assert d is not None and d["depthserve_top1_minus_top2"] == pytest.approx(0.02)
    assert d["depthserve_logprob_of_llama_cpp_token"] == -0.72 and d["depthserve_logprob_of_own_token"] == -0.70
    assert bench_llama_cpp.at_difference([1, 6], [1, 6], None, tops) is None


def test_vs_llama_server_table_with_one_server() -> None:
    r = {"output_tok_s": 80.0, "ttft_p50_ms": 20.0, "tpot_p50_ms": 12.0, "exact_output": True}
    md = bench_vs_llama_server.markdown({"files": [{"name": "m", "runs": {"1": {"depthserve": r}}}]})
    assert "| m | 1 | n/a | 80.0 | n/a | n/a | 20 | n/a | 12.0 | yes |" in md


def test_llama_worker_round_trip_when_built() -> None:
    """Only where `python -m loadtest.llama_cpp build` has run (never in CI): a few greedy tokens."""
    lay = llama_cpp.Layout()
    if os.environ.get("CI"):
        pytest.skip("CI: the machine's llama.cpp cache is not part of the project")
    if not lay.done("python"):
        pytest.skip("llama.cpp not built in the cache")
    model = llama_cpp.builtin_gguf()
    w = bench_llama_cpp.LlamaWorker(lay.python, model, 2, 256)
    try:
        first = w.generate([504, 1463, 282], 4)
        again = w.generate([504, 1463, 282], 4)
    finally:
        w.close()
    assert len(first["ids"]) == 4 and first["ids"] == again["ids"]  # greedy: the same each time
    assert len(first["t"]) == 4

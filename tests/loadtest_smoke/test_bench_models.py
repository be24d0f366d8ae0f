"""Benchmarks of real checkpoints, on tiny ones: `bench latency|throughput --model A --baseline B` offline, and
`bench serving --model A B` against one server with both (the same requests to each, interleaved). No timing
is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.server.conftest import REPO, ServerProcess
from tests.tiny import CORPUS


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    """--num-threads 1 sets torch's threads for this process: give the next tests theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[Path, Path]:
    from tests.tiny import tiny_config, write_tiny

    root = tmp_path_factory.mktemp("twins")
    attnres, _ = write_tiny(root / "tiny-attnres", tiny_config("block", block_size=2), tokenizer_from=tokenizer_dir)
    residual, _ = write_tiny(root / "tiny-residual", tiny_config("none"), tokenizer_from=tokenizer_dir)
    return attnres, residual


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("text") / "prompts.txt"
    p.write_text(CORPUS * 3, encoding="utf-8")
    return p


def test_latency_of_two_checkpoints(twins: tuple[Path, Path], text: Path, tmp_path: Path) -> None:
    from loadtest import bench_latency

    out = tmp_path / "lat.json"
    assert bench_latency.main(["--model", str(twins[0]), "--baseline", str(twins[1]), "--prompts-file", str(text),
                               "--prefill", "16", "400", "--batch", "2", "--repeats", "1", "--dtype", "float32",
                               "--num-threads", "1", "--kv-cache-memory", "16MiB", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["models"]) == ["tiny-attnres", "tiny-residual"]
    # 400 tokens do not fit the 256-token context: skipped, not failed
    assert [r["case"] for r in res["rows"]] == ["prefill tokens=16", "decode batch=2"]
    assert all(min(r["ms"].values()) > 0 for r in res["rows"])


def test_throughput_of_two_checkpoints(twins: tuple[Path, Path], tmp_path: Path) -> None:
    from loadtest import bench_throughput

    out = tmp_path / "tp.json"
    assert bench_throughput.main(["--model", str(twins[0]), "--baseline", str(twins[1]), "--num-prompts", "3",
                                  "--input-len", "4", "12", "--output-len", "3", "5", "--repeats", "1",
                                  "--max-num-seqs", "4", "--dtype", "float32", "--num-threads", "1", "--kv-cache-memory", "16MiB",
                                  "--out", str(out)]) == 0  # prompts: the built-in held-out text
    res = json.loads(out.read_text())
    assert set(res["tok_s"]) == {"tiny-attnres", "tiny-residual"} and min(res["tok_s"].values()) > 0
    for name in res["tok_s"]:
        assert len(res["requests"][name]["ttft_ms"]) == 3 and len(res["requests"][name]["tpot_ms"]) == 3


def test_model_benchmarks_refuse_what_they_cannot_run(twins: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest import bench_latency

    assert bench_latency.main(["--model", str(twins[0]), "--out", str(tmp_path / "x.json")]) == 2
    assert "--baseline" in capsys.readouterr().err
    assert bench_latency.main(["--model", str(twins[0]), "--baseline", str(tmp_path / "missing"),
                               "--out", str(tmp_path / "x.json")]) == 2
    assert "missing" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_model_server(twins: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(twins[0], "--model", str(twins[1]),
                       log_dir=tmp_path_factory.mktemp("bench-models-logs")) as srv:
        yield srv


def test_bench_serving_sends_the_same_stream_to_each_model(two_model_server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    cmd = [sys.executable, "-m", "loadtest.bench_serving", "--base-url", two_model_server.url,
           "--model", "tiny-attnres", "tiny-residual", "--rounds", "2", "--num-prompts", "6", "--concurrency", "3",
           "--input-len", "12", "--output-len", "6", "--range-ratio", "0.5", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr + two_model_server.log()
    assert "| median TTFT ms |" in proc.stdout
    s = json.loads(out.read_text())["models"]
    assert list(s) == ["tiny-attnres", "tiny-residual"]
    lengths = {m: sorted((r["input_len"], r["output_len"]) for r in s[m]["requests"]) for m in s}
    assert lengths["tiny-attnres"] == lengths["tiny-residual"] and len(lengths["tiny-attnres"]) == 6
    assert all(s[m]["completed"] == 6 and s[m]["config"]["model"] == m for m in s)


def test_compare_writes_one_report_with_plots(twins: tuple[Path, Path], text: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from loadtest import bench_compare

    out = tmp_path / "report"
    assert bench_compare.main([str(twins[0]), str(twins[1]), "--out-dir", str(out), "--prompts-file", str(text),
                               "--eval-file", str(text), "--dtype", "float32", "--num-threads", "1", "--kv-cache-memory", "16MiB",
                               "--prefill", "16", "--batch", "1", "2", "--repeats", "1", "--num-prompts", "3",
                               "--input-len", "4", "8", "--output-len", "3", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"] == "tiny-residual" and list(report["models"]) == ["tiny-attnres", "tiny-residual"]
    assert all(p["perplexity"] > 1 and p["tokens"] > 100 for p in report["perplexity"].values())
    assert list(report["depth_attention"]) == ["tiny-attnres"]  # only the AttnRes model has depth weights
    md = (out / "report.md").read_text()
    for png in ("latency.png", "ttft_tpot.png", "throughput.png", "perplexity.png", "depth_tiny-attnres.png"):
        assert f"]({png})" in md and (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "| tiny-attnres |" in md and "## Quality" in md


def test_compare_needs_two_models(twins: tuple[Path, Path], tmp_path: Path) -> None:
    from loadtest import bench_compare

    with pytest.raises(SystemExit) as e:
        bench_compare.main([str(twins[0]), "--out-dir", str(tmp_path)])
    assert e.value.code == 2


def test_model_engines_time_every_prefill() -> None:
    """Each round sends the same prompts: with prefix caching on, later rounds would time cache hits."""
    from loadtest.bench_models import engine_args

    assert engine_args("m", "float32").create_engine_config().cache.enable_prefix_caching is False


def test_compare_without_matplotlib_says_how_to_get_it(twins: tuple[Path, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from loadtest import bench_compare

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        bench_compare.main([str(twins[0]), str(twins[1]), "--out-dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert '".[viz]"' in err and "--no-plots" in err


def test_latency_with_and_without_speculation(twins: tuple[Path, Path], text: Path, tmp_path: Path) -> None:
    """--speculative-config times one model against itself without drafts: greedy outputs must be equal in fp32,
    and the drafting counters must have moved (the tiny model's greedy chat output repeats itself)."""
    from loadtest import bench_latency

    out = tmp_path / "spec.json"
    assert bench_latency.main(["--model", str(twins[0]), "--prompts-file", str(text), "--dtype", "float32",
                               "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}',
                               "--spec-requests", "2", "--spec-max-tokens", "24", "--repeats", "1",
                               "--num-threads", "1", "--kv-cache-memory", "16MiB", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["workloads"]) == {"copy", "chat", "random"}
    copy = res["workloads"]["copy"]
    assert copy["outputs_equal"] is True and res["workloads"]["chat"]["outputs_equal"] is True
    assert res["workloads"]["random"]["outputs_equal"] is None  # sampled
    assert sum(w["verified_steps"] for w in res["workloads"].values()) > 0
    assert all(w["draft_tokens"] >= w["accepted_tokens"] >= 0 for w in res["workloads"].values())
    assert copy["tok_s"]["plain"] > 0 and copy["tok_s"]["spec"] > 0


def test_throughput_with_speculation_and_bad_input(twins: tuple[Path, Path], text: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest import bench_throughput

    out = tmp_path / "spec_tp.json"
    common = ["--prompts-file", str(text), "--dtype", "float32", "--num-threads", "1", "--kv-cache-memory", "16MiB"]
    assert bench_throughput.main(["--model", str(twins[0]), *common, "--num-prompts", "3", "--workload", "copy",
                                  "--speculative-config", '{"method": "ngram"}', "--spec-max-tokens", "16",
                                  "--repeats", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["batched"] and res["workloads"]["copy"]["requests"] == 3
    assert res["workloads"]["copy"]["outputs_equal"] is True
    # errors a user can make: a baseline beside it, bad JSON, a bad key
    assert bench_throughput.main(["--model", str(twins[0]), "--baseline", str(twins[1]), *common,
                                  "--speculative-config", '{"method": "ngram"}']) == 2
    assert "exactly one --model" in capsys.readouterr().err
    assert bench_throughput.main(["--model", str(twins[0]), *common, "--speculative-config", "{method"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert bench_throughput.main(["--model", str(twins[0]), *common, "--speculative-config", '{"method": "x"}']) == 2
    assert "speculative_config.method" in capsys.readouterr().err


def test_spec_divergence_runs(twins: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest import spec_divergence

    assert spec_divergence.main(["--model", str(twins[0]), "--dtype", "float32", "--requests", "1",
                                 "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "copy: " in out and "chat: " in out and "first difference at None" in out  # fp32: never parts

"""EngineArgs: one set of options, defaults and checks for LLM(...), `depthserve serve` and the benchmarks."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import torch

import engine.llm_engine
from engine import LLM, SamplingParams
from engine.arg_utils import EngineArgs
from engine.config import EngineConfig
from models.loader import DEFAULT_MODEL
from server.args import ServerArgs
from server.cli import build_parser, main
from tests.tiny import tiny_config, write_tiny

# a non-default value for every EngineArgs field, and a command line that sets it
NON_DEFAULT = {
    "model": (["--model", "/some/model"], "/some/model"),
    "dtype": (["--dtype", "bfloat16"], "bfloat16"),
    "device": (["--device", "cpu"], "cpu"),
    "seed": (["--seed", "7"], 7),
    "num_threads": (["--num-threads", "3"], 3),
    "depth_stats": (["--depth-stats"], True),
    "kernels": (["--kernels", "reference"], "reference"),
    "max_model_len": (["--max-model-len", "99"], 99),
    "max_num_seqs": (["--max-num-seqs", "5"], 5),
    "max_num_batched_tokens": (["--max-num-batched-tokens", "77"], 77),
    "long_prefill_token_threshold": (["--long-prefill-token-threshold", "32"], 32),
    "block_size": (["--block-size", "8"], 8),
    "kv_cache_memory": (["--kv-cache-memory", "3MiB"], "3MiB"),
    "depth_cache_memory": (["--depth-cache-memory", "5MiB"], "5MiB"),
    "num_kv_blocks": (["--num-kv-blocks", "40"], 40),
    "enable_prefix_caching": (["--no-enable-prefix-caching"], False),
    "tensor_parallel_size": (["--tensor-parallel-size", "2"], 2),
    "speculative_config": (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'],
                           '{"method": "ngram", "num_speculative_tokens": 2}'),
    "gpu_memory_utilization": (["--gpu-memory-utilization", "0.5"], 0.5),
    "enforce_eager": (["--enforce-eager"], True),
    "max_cuda_graph_batch_size": (["--max-cuda-graph-batch-size", "32"], 32),
    "quantization": (["--quantization", "int8"], "int8"),
    "quant_activations": (["--quant-activations", "int8"], "int8"),
    "small_step_rows": (["--small-step-rows", "3"], 3),
}


def serve_ns(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_every_field_is_set_from_the_command_line() -> None:
    names = [f.name for f in dataclasses.fields(EngineArgs)]
    assert sorted(names) == sorted(NON_DEFAULT), "add the new field to NON_DEFAULT (and so to the CLI)"
    assert all(f.metadata.get("help") for f in dataclasses.fields(EngineArgs))
    argv = [a for flags, _ in NON_DEFAULT.values() for a in flags]
    want = EngineArgs(**{k: v for k, (_, v) in NON_DEFAULT.items()})
    assert EngineArgs.from_cli_args(serve_ns(*argv)) == want
    for name, (_, value) in NON_DEFAULT.items():  # each really differs from its default
        assert getattr(EngineArgs(), name) != value, name
    # on a parser of its own, too
    assert EngineArgs.from_cli_args(EngineArgs.add_cli_args(argparse.ArgumentParser()).parse_args(argv)) == want


def test_old_flag_names_still_work() -> None:
    assert EngineArgs.from_cli_args(serve_ns("--depth-metrics")).depth_stats is True
    assert EngineArgs.from_cli_args(serve_ns("--enable-prefix-caching")).enable_prefix_caching is True


def test_defaults_agree_cli_engine_args_llm_and_config(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EngineArgs.from_cli_args(serve_ns()) == EngineArgs()
    cfg = EngineArgs().create_engine_config()
    assert cfg == EngineConfig(model=DEFAULT_MODEL)  # the config dataclasses' own defaults agree

    built: list[EngineConfig] = []

    class Recorder:
        def __init__(self, config: EngineConfig) -> None:
            built.append(config)

        def shutdown(self) -> None:
            pass

    monkeypatch.setattr(engine.llm_engine, "LLMEngine", Recorder)
    LLM(DEFAULT_MODEL)
    LLM(DEFAULT_MODEL, **{k: v for k, (_, v) in NON_DEFAULT.items() if k != "model"})
    assert built[0] == cfg
    assert built[1] == dataclasses.replace(EngineArgs(**{k: v for k, (_, v) in NON_DEFAULT.items()}),
                                           model=DEFAULT_MODEL).create_engine_config()


def test_server_args_defaults_agree_with_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEPTHSERVE_API_KEY", raising=False)
    assert ServerArgs.from_cli_args(serve_ns()) == ServerArgs()
    monkeypatch.setenv("DEPTHSERVE_API_KEY", "k3y")
    assert ServerArgs.from_cli_args(serve_ns()).api_key == "k3y"
    assert ServerArgs.from_cli_args(serve_ns("--api-key", "other")).api_key == "other"


def test_help_does_not_print_the_api_key(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DEPTHSERVE_API_KEY", "s3cret-key")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--enable-prefix-caching" in out and "--long-prefill-token-threshold" in out
    assert "s3cret-key" not in out


@pytest.mark.parametrize(("spelling", "dtype"), [
    ("float32", torch.float32), ("fp32", torch.float32), ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
    ("float16", torch.float16), ("fp16", torch.float16), (torch.float16, torch.float16),
])
def test_dtype_spellings(spelling: str | torch.dtype, dtype: torch.dtype) -> None:
    assert EngineArgs(dtype=spelling).create_engine_config().dtype == dtype
    if isinstance(spelling, str):
        assert EngineArgs.from_cli_args(serve_ns("--dtype", spelling)).create_engine_config().dtype == dtype


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_num_seqs", 0, "max_num_seqs must be >= 1, got 0 (--max-num-seqs)"),
    ("max_num_batched_tokens", -1, "max_num_batched_tokens must be >= 1"),
    ("max_model_len", 1, "max_model_len must be >= 2"),
    ("long_prefill_token_threshold", -5, "long_prefill_token_threshold must be >= 0"),
    ("block_size", 0, "block_size must be >= 1"),
    ("num_kv_blocks", 0, "num_kv_blocks must be >= 1"),
    ("num_threads", 0, "num_threads must be >= 1"),
    ("tensor_parallel_size", 0, "tensor_parallel_size must be >= 1"),
    ("kv_cache_memory", "lots", "kv_cache_memory: cannot read 'lots' as a size"),
    ("kv_cache_memory", 0, "kv_cache_memory must be > 0"),
    ("depth_cache_memory", "-1MiB", "depth_cache_memory: cannot read"),
    ("dtype", "float8", "dtype must be one of"),
    ("max_num_seqs", "4", "max_num_seqs must be an integer"),
    ("seed", 1.5, "seed must be an integer"),
    ("enable_prefix_caching", "no", "enable_prefix_caching must be True or False"),
    ("model", "", "model must be a non-empty"),
])
def test_bad_value_names_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        EngineArgs(**{field: value}).create_engine_config()


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ValueError) as e:
        EngineArgs(max_num_seqs=0, block_size=0).create_engine_config()
    assert "max_num_seqs" in str(e.value) and "block_size" in str(e.value)


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-num-seqs", "0"], "max_num_seqs must be >= 1, got 0 (--max-num-seqs)"),
    (["--num-threads", "0"], "num_threads must be >= 1"),
    (["--num-kv-blocks", "0"], "(--num-kv-blocks)"),
    (["--max-queued-requests", "-1"], "--max-queued-requests must be >= 0"),
    (["--max-body-size", "huge"], "--max-body-size: cannot read 'huge'"),
    (["--header-timeout", "0"], "--header-timeout must be > 0"),
])
def test_cli_bad_values_exit_2_in_one_line(capsys: pytest.CaptureFixture[str], argv: list[str],
                                            message: str) -> None:
    assert main(["serve", "--port", "0", "--log-level", "error", *argv]) == 2  # fails before loading a model
    err = capsys.readouterr().err.strip()
    assert err.startswith("depthserve: error:") and message in err and "\n" not in err, err


def test_llm_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unknown_kw"):
        LLM("/nonexistent/model", unknown_kw=1)
    with pytest.raises(TypeError, match="'a', 'b'"):
        LLM("/nonexistent/model", b=1, a=2, max_num_seqs=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    return write_tiny(tmp_path_factory.mktemp("m"), tiny_config("block", 2, layers=2), tokenizer_from=tokenizer_dir)


def test_llm_options_new_to_the_cli_and_llm_run(tiny) -> None:
    """float16 (rejected by the CLI before), depth_stats (missing from LLM before), the prefix/prefill knobs."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with LLM(str(tiny[0]), dtype="fp16", max_model_len=64, depth_stats=True, enable_prefix_caching=False,
             long_prefill_token_threshold=4, num_kv_blocks=16, num_threads=1) as llm:
        out = llm.generate({"prompt_token_ids": [1, 2, 3, 4, 5, 6]}, params)
        assert len(out[0].outputs[0].token_ids) == 4
        eng = llm.engine
        assert eng.config.dtype == torch.float16 and eng.kv.num_blocks == 16
        assert eng.depth_stats is not None
        assert not eng.config.cache.enable_prefix_caching
        assert eng.config.scheduler.long_prefill_token_threshold == 4

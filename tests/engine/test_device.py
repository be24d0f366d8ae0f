"""The `device` option: validated up front, resolved into EngineConfig, and device='cpu' runs.

The CUDA path itself is exercised by `python -m loadtest.device_check` on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.arg_utils import EngineArgs
from tests.tiny import reference_greedy, tiny_config, write_tiny


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_without_cuda_is_a_value_error_naming_device(no_cuda: None) -> None:
    with pytest.raises(ValueError, match=r"device='cuda'.*--device"):
        EngineArgs(device="cuda").create_engine_config()


def test_unknown_device_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"device must be one of auto, cpu, cuda; got 'tpu' \(--device\)"):
        EngineArgs(device="tpu").create_engine_config()


def test_auto_resolves(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert EngineArgs().create_engine_config().device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert EngineArgs().create_engine_config().device == "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert EngineArgs(tensor_parallel_size=2).create_engine_config().device == "cpu"  # one GPU: gloo on the CPU
    assert EngineArgs(device="cpu").create_engine_config().device == "cpu"


def test_cuda_tensor_parallelism_needs_a_gpu_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 needs 2 GPUs \(one per rank\), but 1 is visible"):
        EngineArgs(device="cuda", tensor_parallel_size=2).create_engine_config()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # NCCL, one GPU per rank
    assert EngineArgs(device="cuda", tensor_parallel_size=2).create_engine_config().device == "cuda"
    assert EngineArgs(tensor_parallel_size=2).create_engine_config().device == "cuda"
    assert EngineArgs(tensor_parallel_size=3).create_engine_config().device == "cpu"  # auto: too few GPUs


def test_device_cpu_runs_and_matches_the_reference(tmp_path) -> None:
    folder, ref = write_tiny(tmp_path / "m", tiny_config("block", 3, layers=5))
    prompt = [1, 5, 6, 7, 8, 9]
    seeded = SamplingParams(temperature=1.0, max_tokens=6, seed=3, ignore_eos=True)
    with LLM(str(folder), device="cpu", max_model_len=64) as llm:
        eng = llm.engine
        assert eng.config.device == "cpu" and eng.runner.device.type == "cpu"
        assert eng.runner.kv_caches[0][0].device.type == "cpu"
        out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        assert out[0].outputs[0].token_ids == reference_greedy(ref, prompt, 6)
        a = llm.generate({"prompt_token_ids": prompt}, seeded)[0].outputs[0].token_ids
        b = llm.generate({"prompt_token_ids": prompt}, seeded)[0].outputs[0].token_ids
        assert a == b  # a seeded request's generator lives with the sampler and replays

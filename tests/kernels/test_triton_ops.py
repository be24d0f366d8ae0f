"""kernels/triton: every op equals its reference (kernels/reference.py) on awkward shapes, and the engine on
the triton backend serves the reference's greedy tokens for std, Block and Full AttnRes models.

With CUDA and TRITON_INTERPRET unset (as loadtest/device_check runs it) the tests run compiled on the GPU.
Elsewhere the kernels run in triton's interpreter, which needs TRITON_INTERPRET=1 twice over: when triton
itself is imported (it decorates tl.sum & co. then) and when our kernels launch (kernels/triton jits each on
first launch in the current mode). This module imports triton with the variable set and puts the environment
back at once, then sets it again only while its own tests run: the rest of the suite never sees it. Should
triton have been imported before this module (without the variable), its tests rerun in a fresh process.
The interpreter is slow: the shapes are tiny.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _env_true(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on", "y")


COMPILED = torch.cuda.is_available() and not _env_true("TRITON_INTERPRET")
DEVICE = "cuda" if COMPILED else "cpu"
if not COMPILED and "triton" not in sys.modules:
    with pytest.MonkeyPatch.context() as _mp:
        _mp.setenv("TRITON_INTERPRET", "1")
        pytest.importorskip("triton", reason="triton is not installed (a dev extra on Linux x86-64)")
else:
    pytest.importorskip("triton", reason="triton is not installed (a dev extra on Linux x86-64)")

from engine import LLM, SamplingParams  # noqa: E402
from engine.arg_utils import EngineArgs  # noqa: E402
from kernels import ops, reference  # noqa: E402
from kernels import triton as tk  # noqa: E402
from models.context import AttentionMetadata  # noqa: E402
from tests.tiny import reference_greedy, tiny_config, write_tiny  # noqa: E402

# triton came in earlier, compiled-only: this process cannot interpret; the tests run in a fresh one instead
STALE = not COMPILED and not tk.library_interpreted()
FRESH_PROCESS_TEST = "test_module_in_a_fresh_process"


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    """TRITON_INTERPRET=1 while this module's tests run on CPU; the environment restored afterwards."""
    if COMPILED or STALE:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture(autouse=True)
def mode(request: pytest.FixtureRequest, interpreter) -> None:
    if (request.node.originalname == FRESH_PROCESS_TEST) != STALE:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: these tests run in a fresh process"
                    if STALE else "triton runs in this process")
    if not STALE:
        assert tk.runs_here(torch.empty(0, device=DEVICE)), "the triton ops would fall back to the reference"


def test_module_in_a_fresh_process() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


EPS = 1e-6
D = 67  # not a power of two: every kernel masks its last columns


def _rand(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def _gain(seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(D, generator=g) + 0.5).to(dtype).to(DEVICE)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    else:  # one or two ulps apart: the interpreter rounds to bf16 by truncation, and the fp32 sums differ
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=2 ** -6)


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
ROWS = pytest.mark.parametrize("t", [1, 33])


# ---- norms ---------------------------------------------------------------------------------------------
@DTYPES
@ROWS
def test_rms_norm(dtype, t) -> None:
    x = _rand(t, D + 13, seed=1, dtype=dtype)[:, 5:5 + D]  # a strided view: row stride 80
    w = _gain(2, dtype)
    _close(tk.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS), dtype)
    # an fp32 input (the depth pool) with a low-precision gain: the output takes the gain's dtype
    xo = _rand(t, 3, D, seed=3)[:, 1]
    _close(tk.rms_norm(xo, w, EPS), reference.rms_norm(xo, w, EPS), dtype)


@DTYPES
@ROWS
def test_add_rms_norm(dtype, t) -> None:
    x = _rand(t, D, seed=4, dtype=dtype)
    res = _rand(t, 2 * D, seed=5, dtype=dtype)[:, ::2]  # column stride 2
    want_res = res.clone()
    w = _gain(6, dtype)
    got = tk.add_rms_norm(x, res, w, EPS)
    want = reference.add_rms_norm(x, want_res, w, EPS)
    _close(res, want_res, dtype)
    _close(got, want, dtype)


# ---- AttnRes -------------------------------------------------------------------------------------------
N_SRC, Q = 4, 6  # pool slots (3 completed blocks + the partial), queries per block (not a power of two)


def _pool(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Depth-pool-like buffers: states, keys [T, N_SRC, D] (states slot-major in memory), lse [T, Q], xo [T, Q, D]."""
    states = _rand(N_SRC, t, D, seed=seed).transpose(0, 1)
    keys = _rand(t, N_SRC, D, seed=seed + 1)
    lse = _rand(t, Q, seed=seed + 2)
    xo = _rand(t, Q, D, seed=seed + 3)
    return states, keys, lse, xo


@DTYPES
@ROWS
@pytest.mark.parametrize("delta", ["add", "start", "none"])
def test_attnres_site(dtype, t, delta) -> None:
    states, _, lse, xo = _pool(t, seed=10)
    ref_states = states.clone()
    d = _rand(t, 3 * D, seed=15, dtype=dtype)[:, D:2 * D] if delta != "none" else None
    w = _gain(16, dtype)
    q = _rand(D, seed=17)
    n, j = 2, 3
    got = tk.attnres_site(states[:, n], d, lse[:, j], xo[:, j], q, w, EPS, accumulate=delta == "add")
    want = reference.attnres_site(ref_states[:, n], d, lse[:, j], xo[:, j], q, w, EPS, accumulate=delta == "add")
    torch.testing.assert_close(states, ref_states, rtol=0, atol=0)  # the partial, updated in place
    _close(got, want, dtype)


@ROWS
@pytest.mark.parametrize("n", [1, N_SRC - 1])
def test_attnres_phase1(t, n) -> None:
    states, keys, lse, xo = _pool(t, seed=20)
    queries = _rand(Q, D, seed=24)
    queries[-1] = 0  # a padding row of a short last block
    ref_keys, ref_lse, ref_xo = keys.clone(), lse.clone(), xo.clone()
    tk.attnres_phase1(states, keys, n, queries, lse, xo, EPS)
    reference.attnres_phase1(states, ref_keys, n, queries, ref_lse, ref_xo, EPS)
    torch.testing.assert_close(keys, ref_keys, rtol=1e-5, atol=1e-5)  # slot n-1 written, the others untouched
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xo, ref_xo, rtol=1e-5, atol=1e-5)


@DTYPES
@ROWS
@pytest.mark.parametrize("delta,picked", [("add", True), ("set", False), ("none", True)])
def test_attnres_mix(dtype, t, delta, picked) -> None:
    """Every n over the pool: the completed source (+= / = delta), its key, the softmax mix and the norm; `rows`
    picks the logits rows (scattered), the others are left untouched."""
    states, keys, _, _ = _pool(t, seed=50)
    d = _rand(t, 3 * D, seed=55, dtype=dtype)[:, D:2 * D] if delta != "none" else None
    w, q = _gain(56, dtype), _rand(D, seed=57)
    rows = torch.arange(t - 1, -1, -2, device=DEVICE) if picked else None
    for n in range(1, N_SRC + 1):
        ref_states, ref_keys = states.clone(), keys.clone()
        got = tk.attnres_mix(states, keys, n, d, q, w, EPS, delta == "add", rows)
        want = reference.attnres_mix(ref_states, ref_keys, n, d, q, w, EPS, delta == "add", rows)
        torch.testing.assert_close(states, ref_states, rtol=0, atol=0)  # slot n-1 of the mixed rows only
        torch.testing.assert_close(keys, ref_keys, rtol=1e-5, atol=1e-5)
        _close(got, want, dtype)


# ---- decode attention ------------------------------------------------------------------------------------
def _decode_case(lens: list[int], heads: int, kv_heads: int, dtype: torch.dtype, block_size: int = 5,
                 head_dim: int = 20, seed: int = 30):
    b = len(lens)
    nb = -(-max(lens) // block_size)
    num_blocks = b * nb + 3
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(num_blocks, generator=g)[:b * nb].view(b, nb)  # scattered block ids
    k_cache = _rand(num_blocks * block_size, kv_heads, head_dim, seed=seed + 1, dtype=dtype)
    v_cache = _rand(num_blocks * block_size, kv_heads, head_dim, seed=seed + 2, dtype=dtype)
    q = _rand(b, heads + 2 * kv_heads, head_dim, seed=seed + 3, dtype=dtype)[:, :heads]  # a view of a qkv row
    pos = torch.arange(max(lens))
    lens_t = torch.tensor(lens, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long, device=DEVICE), num_decode=b, block_size=block_size,
        decode_block_table=table.to(DEVICE), decode_context_lens=lens_t.to(DEVICE),
        decode_gather=(table[:, pos // block_size] * block_size + pos % block_size).to(DEVICE),
        decode_mask=(pos[None, :] < lens_t[:, None])[:, None, None, :].to(DEVICE))
    return q, k_cache, v_cache, meta


DECODE = [([7], 4, 4), ([1, 13, 40, 5, 22], 6, 2), ([9, 3, 17, 1, 30], 3, 1)]  # GQA 1, 3 and 3 (one KV head)


@pytest.mark.parametrize("lens,heads,kv_heads", DECODE, ids=["B1-gqa1", "B5-gqa3", "B5-mqa3"])
@DTYPES
def test_decode_attention(lens, heads, kv_heads, dtype) -> None:
    q, k_cache, v_cache, meta = _decode_case(lens, heads, kv_heads, dtype)
    scale = q.shape[-1] ** -0.5
    got = tk.decode_attention(q, k_cache, v_cache, meta, scale)
    want = reference.decode_attention(q, k_cache, v_cache, meta, scale)
    _close(got, want, dtype)


@pytest.mark.parametrize("splits", [2, 3])
def test_decode_attention_split_k(splits) -> None:
    # one long row and short ones: the later splits of the short rows hold no token
    q, k_cache, v_cache, meta = _decode_case([150, 2, 64, 9], 6, 2, torch.float32, seed=40)
    got = tk.paged_decode(q, k_cache, v_cache, meta.decode_block_table, meta.decode_context_lens, meta.block_size,
                          0.3, splits)
    _close(got, reference.decode_attention(q, k_cache, v_cache, meta, 0.3), torch.float32)


def test_split_heuristic() -> None:
    assert tk.attention.num_splits(1, 8, 200) == 1  # short contexts: one split
    assert tk.attention.num_splits(1, 8, 4096) == 16  # few rows, long context: split up to the cap
    assert tk.attention.num_splits(128, 8, 4096) == 1  # enough rows to fill the GPU


# ---- the backend ---------------------------------------------------------------------------------------
def test_select_backend_triton(monkeypatch, caplog) -> None:
    backend = ops.select_backend("triton", (torch.float32, torch.bfloat16), DEVICE)
    assert backend.name == "triton" and not backend.native and backend.requested == "triton"
    k = ops.kernel_set(backend)
    assert k.native_ops() == ["rms_norm", "add_rms_norm", "attnres_site", "attnres_phase1", "attnres_mix",
                              "decode_attention"]
    assert ops.pack_linear(torch.ones(3, 2), backend).packed is None  # linears stay on the torch path
    assert EngineArgs(kernels="triton").create_engine_config().kernels == "triton"
    if not COMPILED:  # CPU: auto never picks the interpreter
        assert ops.select_backend("auto", (torch.float32,), "cpu").name != "triton"


def test_triton_on_cpu_without_interpreter_falls_back(monkeypatch, caplog) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with caplog.at_level(logging.WARNING, logger="depthserve.kernels"):
        backend = ops.select_backend("triton", (torch.float32,), "cpu")
    assert backend.name == "reference" and "TRITON_INTERPRET" in backend.reason
    assert len([r for r in caplog.records if r.name == "depthserve.kernels"]) == 1
    # an op handed CPU tensors outside the interpreter runs the reference
    x, w = torch.randn(3, D), torch.rand(D) + 0.5
    torch.testing.assert_close(tk.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS), rtol=0, atol=0)


def test_broken_kernel_at_startup_falls_back(caplog) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    with caplog.at_level(logging.WARNING, logger="depthserve.kernels"):
        with pytest.MonkeyPatch.context() as mp:  # a kernel that does not compile
            mp.setattr(tk.attnres, "attnres_site", broken)
            backend = ops.select_backend("triton", (torch.float32,), DEVICE)
        assert backend.name == "reference" and "PassManager::run failed" in backend.reason
        with pytest.MonkeyPatch.context() as mp:  # a kernel that computes something else
            mp.setattr(tk.norm, "rms_norm", lambda x, w, eps: reference.rms_norm(x, w, eps) + 1)
            backend = ops.select_backend("triton", (torch.float32,), DEVICE)
        assert backend.name == "reference" and "rms_norm (torch.float32) disagrees" in backend.reason
    assert len([r for r in caplog.records if r.name == "depthserve.kernels"]) == 2


def test_triton_not_importable_falls_back(monkeypatch, caplog) -> None:
    def missing():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(ops, "_import_triton_ops", missing)
    with caplog.at_level(logging.WARNING, logger="depthserve.kernels"):
        backend = ops.select_backend("triton", (torch.float32,), DEVICE)
        auto = ops.select_backend("auto", (torch.float32,), "cuda")
    assert backend.name == "reference" and "not importable" in backend.reason
    assert auto.name == "reference" and auto.requested == "auto"
    assert len([r for r in caplog.records if r.name == "depthserve.kernels"]) == 2


# ---- the engine on the triton backend ------------------------------------------------------------------
PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 20, 30]]
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.mark.parametrize("mode,block_size,layers", [("none", 0, 2), ("block", 2, 3), ("full", 0, 2)],
                         ids=["none-L2", "block2-L3", "full-L2"])
def test_engine_greedy_equals_reference(tmp_path, mode, block_size, layers) -> None:
    folder, ref = write_tiny(tmp_path, tiny_config(mode, block_size, layers=layers))
    expected = [reference_greedy(ref.to(DEVICE), p, GREEDY.max_tokens, device=DEVICE) for p in PROMPTS]
    # a small KV cache and depth pool: the interpreter copies every tensor argument's storage per launch
    with LLM(str(folder), max_model_len=32, kernels="triton", device=DEVICE, dtype="float32", block_size=4,
             num_kv_blocks=24, depth_cache_memory="256KiB") as llm:
        assert llm.engine.kernels.name == "triton"
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected

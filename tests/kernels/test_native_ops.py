"""The native C++ CPU ops (kernels/csrc, built by kernels/cpu_ext) against their references.

Each op is called directly (torch.ops.depthserve.*, so a failure cannot hide behind the wrapper's fallback)
on odd shapes: d not a multiple of any vector width, one row, 33 rows and 700 rows (the parallel path), the
strided depth-pool views the model passes, fp32 and bf16. Then the wrappers' fallback, the op-set choice, the
build cache and its failure modes, and the engine's greedy tokens on the native ops.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from kernels import cpu_attention, cpu_ext, ops, reference
from tests.tiny import MAX_TOKENS, PROMPTS, expected_greedy, tiny_config, write_tiny

F32, BF16 = torch.float32, torch.bfloat16
EPS = 1e-6
DIMS = [67, 579]
ROWS = [1, 33, 700]
NATIVE = ops.Backend("reference", "native")  # native ops whatever the linears (bf16 linears need AVX-512 here)


@pytest.fixture(scope="module")
def ds():
    """torch.ops.depthserve with the library loaded (a skip only where no compiler could build it)."""
    if cpu_ext.load() is None:
        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip("no C++ compiler: the native ops cannot be built here")
        pytest.fail("the native CPU ops did not build or load (see the depthserve.kernels warning)")
    return torch.ops.depthserve


def _gen(*seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(seed) % 2 ** 31)


def _rand(g: torch.Generator, *shape: int, dtype: torch.dtype = F32, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


def _weight(g: torch.Generator, d: int, dtype: torch.dtype) -> torch.Tensor:
    return (1 + 0.2 * torch.randn(d, generator=g)).to(dtype)


def assert_matches(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-6) -> None:
    """fp32: within `rel` of the tensor's magnitude (summation order is all that differs). bf16: both round an
    fp32 value that differs by about that much, so a rounding flips now and then (rarely): one bf16 ulp, which
    rms_norm's product with a bf16 weight rounds once more (2^-7 + 2^-8 relative at most)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.float(), want.float()
    scale = float(w.abs().max()) if w.numel() else 0.0
    if want.dtype == F32:
        torch.testing.assert_close(g, w, rtol=rel, atol=rel * scale)
    else:
        torch.testing.assert_close(g, w, rtol=2 ** -6, atol=rel * scale)
        assert (g != w).float().mean() <= 1e-3, f"{int((g != w).sum())} of {g.numel()} bf16 values differ"


# ---- each op against its reference --------------------------------------------------------------------
@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("x_dtype,w_dtype", [(F32, F32), (BF16, BF16), (F32, BF16)], ids=["f32", "bf16", "f32-bf16w"])
def test_rms_norm(ds, t, d, x_dtype, w_dtype) -> None:
    g = _gen(t, d, 1)
    pool = _rand(g, t, 3, d, dtype=x_dtype, scale=3.0)
    w = _weight(g, d, w_dtype)
    for x in (pool[:, 1], pool[:, 0].contiguous()):  # a strided view of a pool, and plain rows
        assert_matches(ds.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS))


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("heads,kv_heads,hd", [(9, 3, 64), (4, 4, 38)])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_rotary(ds, t, heads, kv_heads, hd, dtype) -> None:
    """In place on the q and k views of a packed QKV row (as the model passes them), vs the reference's copies."""
    g = _gen(t, heads, hd, 7)
    qkv = _rand(g, t, (heads + 2 * kv_heads) * hd, dtype=dtype, scale=2.0)
    q = qkv[:, :heads * hd].view(t, heads, hd)
    k = qkv[:, heads * hd:(heads + kv_heads) * hd].view(t, kv_heads, hd)
    angles = torch.rand(t, 1, hd // 2, generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    want_q, want_k = reference.rotary(q, k, cos, sin)
    v = qkv[:, (heads + kv_heads) * hd:].clone()
    assert ds.rotary(q, k, cos, sin) is None
    assert_matches(q, want_q)
    assert_matches(k, want_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * hd:], v)  # V untouched


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_add_rms_norm(ds, t, d, dtype) -> None:
    g = _gen(t, d, 2)
    x = _rand(g, t, d, dtype=dtype)
    pool = _rand(g, t, 2, d, dtype=dtype, scale=3.0)
    pool_ref = pool.clone()
    w = _weight(g, d, dtype)
    got = ds.add_rms_norm(x, pool[:, 1], w, EPS)
    want = reference.add_rms_norm(x, pool_ref[:, 1], w, EPS)
    assert torch.equal(pool, pool_ref)  # the same rounded residual, and nothing else written
    assert_matches(got, want)


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("delta", ["accumulate", "assign", "none"])
def test_attnres_site(ds, t, d, dtype, delta) -> None:
    """The model's call: partial = states[:, n], lse1 = lse[:, j], xo1 = xo[:, j] (rows of a depth pool)."""
    g = _gen(t, d, 3)
    n_src, q, n, j = 5, 6, 2, 3
    states, lse, xo = _rand(g, t, n_src, d), _rand(g, t, q, scale=4.0), _rand(g, t, q, d)
    query = _rand(g, d, scale=0.5 / d ** 0.5 * 8)
    w = _weight(g, d, dtype)
    dl = _rand(g, t, d, dtype=dtype) if delta != "none" else None
    ref_states = states.clone()
    acc = delta != "assign"
    got = ds.attnres_site(states[:, n], dl, lse[:, j], xo[:, j], query, w, EPS, acc)
    want = reference.attnres_site(ref_states[:, n], dl, lse[:, j], xo[:, j], query, w, EPS, acc)
    assert torch.equal(states, ref_states)  # partial += / = delta exactly, nothing else written
    assert_matches(got, want, rel=1e-5)  # through a sigmoid and a lerp: a few ulps of the magnitude


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("block_size", [3, 4])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_attnres_phase1(ds, t, d, block_size, n) -> None:
    """Pool of N + 1 = 5 sources; Q = 2 * block_size queries (6: a remainder after groups of four)."""
    g = _gen(t, d, block_size, n)
    q = 2 * block_size
    states = _rand(g, t, 5, d)
    keys, lse, xo = _rand(g, t, 5, d), _rand(g, t, q), _rand(g, t, q, d)
    queries = _rand(g, q, d, scale=0.3)
    queries[-1] = 0  # a short last block's zero-padded query
    keys[:, :n - 1] = reference.key_of(states[:, :n - 1], EPS)  # the pool's invariant: a source's key is key_of
    ref = [a.clone() for a in (keys, lse, xo)]
    assert ds.attnres_phase1(states, keys, n, queries, lse, xo, EPS) is None
    reference.attnres_phase1(states, ref[0], n, queries, ref[1], ref[2], EPS)
    assert torch.equal(keys[:, n:], ref[0][:, n:]) and torch.equal(keys[:, :n - 1], ref[0][:, :n - 1])
    assert_matches(keys[:, n - 1], ref[0][:, n - 1])
    assert_matches(lse, ref[1])
    assert_matches(xo, ref[2], rel=1e-5)


@pytest.mark.parametrize("d", [512, 515])
def test_attnres_phase1_streamed_xo(ds, d) -> None:
    """Prefill-sized xo (>= 16 MB: written with non-temporal stores when rows are vector-aligned, d = 512, and
    with ordinary stores when they are not, d = 515) equals the reference like the small calls do."""
    t, q, n = 1040, 8, 3
    g = _gen(t, d, q, n)
    states, keys = _rand(g, t, 4, d), _rand(g, t, 4, d)
    lse, xo = _rand(g, t, q), _rand(g, t, q, d)
    assert t * q * d * 4 >= 16 << 20
    queries = _rand(g, q, d, scale=0.3)
    keys[:, :n - 1] = reference.key_of(states[:, :n - 1], EPS)
    ref = [a.clone() for a in (keys, lse, xo)]
    ds.attnres_phase1(states, keys, n, queries, lse, xo, EPS)
    reference.attnres_phase1(states, ref[0], n, queries, ref[1], ref[2], EPS)
    assert_matches(lse, ref[1])
    assert_matches(xo, ref[2], rel=1e-5)


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("f", [67, 1536])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_silu_mul(ds, t, f, dtype) -> None:
    """gu = [gate | up] as the MLP's merged projection gives it, and a strided view of a wider buffer."""
    g = _gen(t, f, 8)
    wide = _rand(g, t, 2 * f + 5, dtype=dtype, scale=4.0)
    for gu in (wide[:, 2:2 * f + 2], wide[:, :2 * f].contiguous()):
        got = ds.silu_mul(gu)
        assert got.is_contiguous()
        assert_matches(got, reference.silu_mul(gu))  # fp32: the exponential's few ulps; bf16: the same roundings


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_silu_mul_special_values(ds, dtype) -> None:
    """Where e^-x overflows (x <= -88.7: silu = -0), underflows, and NaN / inf, as F.silu gives them."""
    gate = torch.tensor([float("nan"), float("inf"), -float("inf"), -88.0, -88.5, -88.72, -88.73, -89.0, -1e4,
                         86.0, 89.0, 1e4, 0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, -87.0, 3.0]).to(dtype)
    gu = torch.cat([gate, torch.linspace(-3, 3, len(gate)).to(dtype)]).unsqueeze(0)
    got, want = ds.silu_mul(gu), reference.silu_mul(gu)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0, equal_nan=True)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.signbit(), want.signbit())


def test_silu_mul_on_tensor_parallel_shards(ds) -> None:
    """Under TP the MLP's gu is a rank's shard [T, 2 f_local] (its gate rows, then its up rows): the ranks'
    outputs side by side are the unsharded output."""
    g = _gen(9)
    t, f, tp = 5, 134, 2
    gate, up = _rand(g, t, f, scale=3.0), _rand(g, t, f)
    full = reference.silu_mul(torch.cat([gate, up], 1))
    n = f // tp
    parts = [ds.silu_mul(torch.cat([gate[:, r * n:(r + 1) * n], up[:, r * n:(r + 1) * n]], 1)) for r in range(tp)]
    assert_matches(torch.cat(parts, 1), full)


def _kv_case(g: torch.Generator, t: int, heads: int, kv_heads: int, hd: int, slots: int, dtype: torch.dtype):
    """k, v as the model's views of a packed QKV output, and two caches [slots, KV, hd] of random content."""
    qkv = _rand(g, t, (heads + 2 * kv_heads) * hd, dtype=dtype)
    k = qkv[:, heads * hd:(heads + kv_heads) * hd].view(t, kv_heads, hd)
    v = qkv[:, (heads + kv_heads) * hd:].view(t, kv_heads, hd)
    return k, v, _rand(g, slots, kv_heads, hd, dtype=dtype), _rand(g, slots, kv_heads, hd, dtype=dtype)


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("heads,kv_heads,hd", [(9, 3, 64), (4, 4, 38)])
@pytest.mark.parametrize("dtype", [F32, BF16, torch.float16], ids=["f32", "bf16", "f16"])
def test_store_kv(ds, t, heads, kv_heads, hd, dtype) -> None:
    """Scattered slots of a cache with more slots than rows: exactly index_copy_'s caches, nothing else written."""
    g = _gen(t, heads, hd, 10)
    k, v, k_cache, v_cache = _kv_case(g, t, heads, kv_heads, hd, 2 * t + 3, dtype)
    slots = torch.randperm(2 * t + 3, generator=g)[:t]
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, want_k, want_v, slots)
    assert ds.store_kv(k, v, k_cache, v_cache, slots) is None
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_store_kv_edge_cases(ds) -> None:
    """No rows; rows that share a slot (the padded decode batch's pad rows, all in the scratch block: one of them
    lands); a slot out of range, -1 included, raises before anything is written, as index_copy_ raises."""
    g = _gen(11)
    k, v, k_cache, v_cache = _kv_case(g, 3, 4, 2, 8, 6, BF16)
    before = (k_cache.clone(), v_cache.clone())
    ds.store_kv(k[:0], v[:0], k_cache, v_cache, torch.zeros(0, dtype=torch.long))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    for bad in ([0, 6, 1], [2, -1, 0]):
        with pytest.raises(RuntimeError, match="outside"):
            ds.store_kv(k, v, k_cache, v_cache, torch.tensor(bad))
        assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
        with pytest.raises(IndexError, match="out of bounds"):  # the wrapper: the reference's own error
            ops.kernel_set(NATIVE).store_kv(k, v, k_cache.clone(), v_cache.clone(), torch.tensor(bad))
    ds.store_kv(k, v, k_cache, v_cache, torch.tensor([4, 1, 4]))
    assert torch.equal(k_cache[1], k[1]) and torch.equal(v_cache[1], v[1])
    assert any(torch.equal(k_cache[4], k[i]) and torch.equal(v_cache[4], v[i]) for i in (0, 2))


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("delta", ["accumulate", "assign", "none"])
@pytest.mark.parametrize("picked", [False, True], ids=["all-rows", "picked-rows"])
def test_attnres_mix(ds, t, d, dtype, delta, picked) -> None:
    """Every n of a pool of 9 sources (1 .. 9: remainders after groups of four keys and sources), on the
    strided pool views the model passes; `rows` picks some rows in a scattered order (the logits rows)."""
    g = _gen(t, d, 5)
    n_src = 9
    states = _rand(g, n_src, t, d, scale=2.0).transpose(0, 1)  # slot-major in memory: a strided row stride
    keys = reference.key_of(states, EPS)  # the pool's invariant: every completed source's key is key_of(it)
    query = _rand(g, d, scale=0.5 / d ** 0.5 * 8)
    w = _weight(g, d, dtype)
    dl = _rand(g, t, d, dtype=dtype) if delta != "none" else None
    rows = torch.randperm(t, generator=g)[:max(1, t // 3)] if picked else None
    got, want = [], []
    for n in range(1, n_src + 1) if t < 700 else (1, 4, 9):  # the parallel path: fewer n (slow reference)
        ref_states, ref_keys = states.clone(), keys.clone()
        got.append(ds.attnres_mix(states, keys, n, dl, query, w, EPS, delta == "accumulate", rows))
        want.append(reference.attnres_mix(ref_states, ref_keys, n, dl, query, w, EPS, delta == "accumulate", rows))
        assert torch.equal(states, ref_states)  # source n-1 of the mixed rows += / = delta exactly, nothing else
        assert torch.equal(keys[:, n:], ref_keys[:, n:]) and torch.equal(keys[:, :n - 1], ref_keys[:, :n - 1])
        assert_matches(keys[:, n - 1], ref_keys[:, n - 1])
    # softmax over up to 9 sources, then the norm: a few ulps of fp32 apart, so a bf16 rounding flips about once
    # in a thousand values (one such flip in a single 67-wide row would fail assert_matches' fraction alone)
    got_all, want_all = torch.cat(got), torch.cat(want)  # [9 * rows, d]
    if dtype == BF16 and got_all.numel() < 4000:
        torch.testing.assert_close(got_all.float(), want_all.float(), rtol=2 ** -6, atol=1e-5)
        assert int((got_all != want_all).sum()) <= 3
    else:
        assert_matches(got_all, want_all, rel=1e-5)


def test_attnres_mix_rejects_rows_outside_the_pool(ds) -> None:
    states, keys = torch.randn(3, 2, 67), torch.randn(3, 2, 67)
    before = states.clone(), keys.clone()
    with pytest.raises(RuntimeError, match="outside"):
        ds.attnres_mix(states, keys, 2, torch.randn(3, 67), torch.randn(67), torch.ones(67), EPS, True,
                       torch.tensor([0, 3]))
    assert torch.equal(states, before[0]) and torch.equal(keys, before[1])  # checked before anything is written


def test_empty_batch(ds) -> None:
    w = torch.ones(67)
    assert ds.rms_norm(torch.randn(0, 67), w, EPS).shape == (0, 67)
    assert ds.attnres_site(torch.randn(0, 67), None, torch.randn(0), torch.randn(0, 67), w, w, EPS, True).shape == (0, 67)
    assert ds.silu_mul(torch.randn(0, 134)).shape == (0, 67)
    pool = torch.randn(0, 3, 67)
    assert ds.attnres_mix(pool, pool.clone(), 2, None, w, w, EPS, False, None).shape == (0, 67)
    pool = torch.randn(4, 3, 67)  # rows of a step, none picked
    assert ds.attnres_mix(pool, pool.clone(), 2, None, w, w, EPS, True, torch.zeros(0, dtype=torch.long)).shape == (0, 67)


# ---- the wrappers, and which set the model gets ----------------------------------------------------------
def test_kernel_set_uses_native_ops_where_asked(ds) -> None:
    native = ops.kernel_set(NATIVE)
    assert set(native.native_ops()) == {"rms_norm", "add_rms_norm", "attnres_site", "attnres_phase1", "attnres_mix",
                                        "decode_attention", "rotary", "silu_mul", "store_kv", "decode_layer",
                                        "decode_layers"}
    assert native.decode_attention is cpu_attention.native_decode_attention  # kernels/csrc/decode_attention.cpp
    assert ops.kernel_set(ops.Backend("native", "auto")).native_ops()  # linears native too
    assert ops.kernel_set(ops.select_backend("reference")) is ops.REFERENCE_OPS
    assert ops.kernel_set(NATIVE, "meta") is ops.REFERENCE_OPS  # off the CPU: the reference (or another backend)
    assert ops.Backend("reference", "auto", "bf16 linears unavailable").native_ops


def test_wrappers_fall_back_on_tensors_the_kernel_does_not_take(ds) -> None:
    k = ops.kernel_set(NATIVE)
    g = _gen(4)
    w = _weight(g, 67, F32)
    cases = [
        _rand(g, 67, 5).t(),  # inner dim not contiguous
        _rand(g, 5, 67, dtype=torch.float16),  # a dtype the kernel does not take
        _rand(g, 2, 5, 67),  # three dims
    ]
    for x in cases:
        torch.testing.assert_close(k.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS), rtol=0, atol=0)
    # in-place ops: the kernel checks everything before it writes, so the reference sees the inputs untouched
    res, res_ref = _rand(g, 67, 5).t(), None
    res_ref = res.clone()
    x = _rand(g, 5, 67)
    torch.testing.assert_close(k.add_rms_norm(x, res, w, EPS), reference.add_rms_norm(x, res_ref, w, EPS))
    torch.testing.assert_close(res, res_ref)
    partial, xo1 = _rand(g, 3, 67), _rand(g, 67, 3).t()  # xo1 with a strided inner dim
    p_ref = partial.clone()
    lse1, query, delta = _rand(g, 3), _rand(g, 67, scale=0.1), _rand(g, 3, 67)
    got = k.attnres_site(partial, delta, lse1, xo1, query, w, EPS)
    torch.testing.assert_close(got, reference.attnres_site(p_ref, delta, lse1, xo1, query, w, EPS))
    torch.testing.assert_close(partial, p_ref)
    for gu in (_rand(g, 134, 5).t(), _rand(g, 5, 134, dtype=torch.float16)):  # strided inner dim; float16
        torch.testing.assert_close(k.silu_mul(gu), reference.silu_mul(gu), rtol=0, atol=0)
    kk, v, k_cache, v_cache = _kv_case(g, 3, 4, 2, 8, 6, F32)
    kk = kk.transpose(1, 2).contiguous().transpose(1, 2)  # a strided head dim
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(kk, v, want_k, want_v, torch.tensor([5, 0, 2]))
    k.store_kv(kk, v, k_cache, v_cache, torch.tensor([5, 0, 2]))
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    states, keys = _rand(g, 3, 2, 67), _rand(g, 67, 3, 2).permute(1, 2, 0)  # keys with a strided inner dim
    s_ref, k_ref = states.clone(), keys.clone()
    got = k.attnres_mix(states, keys, 2, delta, query, w, EPS, True)
    torch.testing.assert_close(got, reference.attnres_mix(s_ref, k_ref, 2, delta, query, w, EPS, True))
    torch.testing.assert_close(states, s_ref)
    torch.testing.assert_close(keys, k_ref)


# ---- build, cache and failure ------------------------------------------------------------------------------
@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """An empty kernel cache and a loader that has not run yet in this process (restored afterwards)."""
    monkeypatch.setenv(cpu_ext.ENV_CACHE, str(tmp_path / "cache"))
    cpu_ext.reset()
    ops._native_ops.cache_clear()
    yield tmp_path / "cache"
    cpu_ext.reset()
    ops._native_ops.cache_clear()


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "depthserve.kernels" and r.levelno == logging.WARNING]


def test_no_build_allowed_means_reference_and_one_warning(fresh_loader, monkeypatch, caplog) -> None:
    monkeypatch.setenv(cpu_ext.ENV_NO_BUILD, "1")
    with caplog.at_level(logging.WARNING, logger="depthserve.kernels"):
        assert ops.kernel_set(NATIVE) is ops.REFERENCE_OPS
        assert ops.kernel_set(NATIVE) is ops.REFERENCE_OPS  # asked again: no second warning
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and cpu_ext.ENV_NO_BUILD in warnings[0].getMessage()


def test_failed_build_means_reference_and_one_warning(fresh_loader, monkeypatch, caplog, tmp_path) -> None:
    def no_compiler() -> str:
        raise cpu_ext.BuildError("no C++ compiler found (set CXX, or install g++)")

    monkeypatch.setattr(cpu_ext, "_compiler", no_compiler)
    with caplog.at_level(logging.WARNING, logger="depthserve.kernels"):
        assert cpu_ext.load() is None
        assert ops.kernel_set(NATIVE) is ops.REFERENCE_OPS
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()


def test_a_source_that_does_not_compile_is_left_out(fresh_loader, monkeypatch, caplog, tmp_path) -> None:
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "good.cpp").write_text("int depthserve_test_symbol() { return 1; }\n")  # no torch headers: fast
    (src / "broken.cpp").write_text("this is not C++;\n")
    monkeypatch.setattr(cpu_ext, "SRC_DIR", src)
    with caplog.at_level(logging.WARNING, logger="depthserve.kernels"):
        ext = cpu_ext.load()
    assert ext is not None and ext.sources == ("good.cpp",) and ext.skipped == ("broken.cpp",)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "broken.cpp" in warnings[0].getMessage()
    assert "error" in (ext.path.parent / "build.log").read_text()


def test_a_failed_source_leaves_the_composed_layer_out(fresh_loader, monkeypatch, caplog, tmp_path) -> None:
    """decode_layer.cpp calls the other sources' kernels: when one of them fails, it is left out too (its
    undefined symbols would make the whole library fail to load)."""
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "good.cpp").write_text("int depthserve_test_symbol() { return 1; }\n")
    (src / "decode_layer.cpp").write_text("int depthserve_test_layer() { return 2; }\n")
    (src / "broken.cpp").write_text("this is not C++;\n")
    monkeypatch.setattr(cpu_ext, "SRC_DIR", src)
    with caplog.at_level(logging.WARNING, logger="depthserve.kernels"):
        ext = cpu_ext.load()
    assert ext is not None and ext.sources == ("good.cpp",) and ext.skipped == ("broken.cpp", "decode_layer.cpp")
    assert len(_warnings(caplog)) == 1


def test_concurrent_builds_compile_once(fresh_loader, monkeypatch) -> None:
    """Two builders at once (threads here; the lock is fcntl's, per open file, so processes alike): one
    compiles, the other waits and loads its library."""
    calls = []

    def fake_compile(folder: Path):
        calls.append(folder)
        time.sleep(0.3)
        lib = folder / "tmp-fake" / "lib.so"
        lib.parent.mkdir()
        lib.write_bytes(b"not really a library")
        return lib, ["norms.cpp"], []

    monkeypatch.setattr(cpu_ext, "_compile", fake_compile)
    monkeypatch.setattr(cpu_ext, "_compiler", lambda: "c++")
    results = []
    threads = [threading.Thread(target=lambda: results.append(cpu_ext._ensure_built())) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(calls) == 1
    assert len(results) == 2 and results[0][0] == results[1][0] and results[0][0].read_bytes().startswith(b"not")
    assert sorted(r[2] for r in results) == [False, True]  # one built it, the other found it


def test_build_key_follows_cpu_flags_and_march(fresh_loader, monkeypatch) -> None:
    base = cpu_ext._key()
    monkeypatch.setattr(cpu_ext, "cpu_flags", lambda: {"sse2"})
    assert cpu_ext._key() != base  # a -march=native build never runs on another kind of CPU
    monkeypatch.setenv(cpu_ext.ENV_MARCH, "x86-64-v3")
    portable = cpu_ext._key()
    monkeypatch.setattr(cpu_ext, "cpu_flags", lambda: {"avx2"})
    assert cpu_ext._key() == portable  # a portable build does not depend on the CPU it was built on ...
    if cpu_ext.platform.machine() in ("x86_64", "AMD64"):
        with pytest.raises(cpu_ext.BuildError, match="lacks"):  # ... but only runs where its ISA is
            cpu_ext._check_cpu()


def test_prebuild_command(ds, capsys) -> None:
    assert cpu_ext.main([]) == 0
    out = capsys.readouterr().out
    assert "depthserve_cpu.so" in out and "torch.ops.depthserve.attnres_site" in out


# ---- the engine on the native ops ----------------------------------------------------------------------
@pytest.fixture(scope="module", params=[("none", 0, 4), ("block", 2, 5), ("block", 3, 5), ("full", 0, 4)],
                ids=["none-L4", "block2-L5", "block3-L5", "full-L4"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    mode, bs, layers = request.param
    folder, _ = write_tiny(tmp_path_factory.mktemp("m"), tiny_config(mode, bs, layers=layers))
    return folder, [list(t) for t in expected_greedy(mode, bs, layers)]


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_engine_greedy_equals_reference_on_native_ops(ds, model) -> None:
    folder, expected = model
    llm = LLM(str(folder), max_model_len=64, max_num_batched_tokens=5, block_size=4, kernels="native")
    model = llm.engine.model
    assert {"silu_mul", "store_kv"} <= set(model.k.native_ops())
    assert all(layer.mlp.silu_mul is model.k.silu_mul and layer.self_attn.store_kv is model.k.store_kv
               for layer in model.layers)  # both models' layers call the kernel set's ops
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected

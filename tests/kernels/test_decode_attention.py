"""kernels/csrc/decode_attention.cpp (depthserve::decode_attention, through kernels.cpu_attention) equals the
reference decode attention: batch 1 and 33, GQA 1 to 5, hd 64 and odd ones, block sizes 16 and 5, short,
long and mixed contexts on scattered blocks and around the kernel's tile edges, fp32 and bf16, strided views,
and batch 1's split-K path over a long context.

Until the shared extension loader exists, this file builds the one source itself (skipped, with the reason,
where it cannot be compiled)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from kernels import cpu_attention, ops, reference
from models.context import AttentionMetadata
from tests.tiny import PROMPTS, reference_greedy, tiny_config, write_tiny


@pytest.fixture(scope="module")
def native_op():
    """torch.ops.depthserve.decode_attention, from the native library (built and cached by kernels/cpu_ext.py)."""
    try:
        return cpu_attention.ensure_loaded()
    except Exception as e:  # noqa: BLE001 - no compiler, no headers, ...: nothing to test here
        last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        pytest.skip(f"the decode_attention extension cannot be built here: {type(e).__name__}: {last}")


def make_meta(lens: list[int], block_size: int, num_blocks: int, seed: int) -> AttentionMetadata:
    """Decode metadata as engine/model_runner.py builds it, over block ids scattered through the cache."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    nb = max(need)
    ids = torch.randperm(num_blocks, generator=g)[: sum(need)]
    table = torch.full((len(lens), nb + 2), -1, dtype=torch.long)  # padded past what any row uses
    at = 0
    for b, k in enumerate(need):
        table[b, :k] = ids[at:at + k]
        at += k
    table = torch.where(table < 0, torch.zeros_like(table), table)  # unused entries: some valid block
    lens_t = torch.tensor(lens, dtype=torch.long)
    c = int(lens_t.max())
    block_table = table[:, :-(-c // block_size)]
    gather = (block_table.unsqueeze(-1) * block_size + torch.arange(block_size)).reshape(len(lens), -1)[:, :c]
    mask = (torch.arange(c).unsqueeze(0) < lens_t.unsqueeze(1))[:, None, None, :]
    return AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decode=len(lens),
                             block_size=block_size, decode_block_table=block_table,
                             decode_context_lens=lens_t.to(torch.int32), decode_gather=gather, decode_mask=mask)


def make_case(lens: list[int], heads: int, kv: int, hd: int, block_size: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) * 2 + 3
    meta = make_meta(lens, block_size, num_blocks, seed)
    slots = num_blocks * block_size
    q = torch.randn(len(lens), heads, hd, generator=g).to(dtype)
    k = (torch.randn(slots, kv, hd, generator=g) * 1.5).to(dtype)
    v = torch.randn(slots, kv, hd, generator=g).to(dtype)
    return q, k, v, meta, hd ** -0.5


def check(native_op, q, k, v, meta, scale) -> None:
    got = cpu_attention.native_decode_attention(q, k, v, meta, scale)
    direct = native_op(q, k, v, meta.decode_block_table, meta.decode_context_lens, meta.block_size, scale)
    assert torch.equal(got, direct)  # the wrapper ran the op
    want = reference.decode_attention(q, k, v, meta, scale)
    assert got.dtype == q.dtype and got.shape == q.shape
    if q.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    # bf16: the kernel computes in fp32 from the bf16 inputs and rounds once, so it is within half a bf16
    # spacing (at most 2^-8 relative) of the fp32 result of the same inputs, plus fp32 noise. SDPA rounds its
    # probabilities to bf16 as well, so the reference may sit a few roundings further away.
    exact = reference.decode_attention(q.float(), k.float(), v.float(), meta, scale)
    torch.testing.assert_close(got.float(), exact, rtol=2 ** -8 * 1.01, atol=1e-5)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=2 ** -7)


LENS = {"1": [1], "7": [7], "300": [300]}
LENS_33 = {"1": [1] * 33, "7": [7] * 33, "300": [300] * 33,
           "mixed": [1 + (i * 37) % 300 for i in range(32)] + [300]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("hd", [64, 40, 72])
@pytest.mark.parametrize("heads,kv", [(4, 4), (9, 3)], ids=["mha", "gqa3"])
@pytest.mark.parametrize("batch,lens_id", [(1, k) for k in LENS] + [(33, k) for k in LENS_33],
                         ids=lambda x: str(x))
def test_matches_reference(native_op, batch, lens_id, heads, kv, hd, block_size, dtype) -> None:
    lens = (LENS if batch == 1 else LENS_33)[lens_id]
    check(native_op, *make_case(lens, heads, kv, hd, block_size, dtype, seed=len(lens) + hd + block_size))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lens", [[3000], [4093, 65, 1], [1000, 700, 64, 1]], ids=["b1", "b3-mixed", "b4-mixed"])
def test_long_context_split_k(native_op, lens, dtype, threads) -> None:
    """Few long rows for the threads: contexts are cut into partitions (row 0 of b3-mixed into 15, b4-mixed's
    rows into 8, 6 and 1) and merged, next to rows that are not cut; one thread keeps a single pass. All equal
    the reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check(native_op, *make_case(lens, 9, 3, 64, 16, dtype, seed=11))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,kv,hd", [(8, 2, 64), (10, 2, 36), (5, 1, 16), (6, 3, 4)],
                         ids=["g4", "g5-hd36", "g5-hd16", "g2-hd4"])
def test_tile_edges(native_op, heads, kv, hd, dtype) -> None:
    """The op walks a context in tiles of 32 positions (rows padded to a multiple of 8), a GQA group's heads in
    passes of up to 3 (4 = 3 + 1, 5 = 3 + 2), and reads head dims that are not a multiple of the vector width
    (36, 4) through zero-padded fp32 copies: contexts on, just before and just after tile edges."""
    lens = [1, 8, 31, 32, 33, 63, 64, 65, 97]
    check(native_op, *make_case(lens, heads, kv, hd, 5, dtype, seed=heads + hd))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_k_over_copied_rows(native_op, dtype) -> None:
    """Split-K partitions and their merge on the path that copies rows (hd 36 is not a multiple of the vector
    width), with a GQA group of 5 (passes of 3 and 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check(native_op, *make_case([2000, 37], 10, 2, 36, 16, dtype, seed=13))
    finally:
        torch.set_num_threads(before)


def test_large_scores_stay_finite(native_op) -> None:
    """Scores far beyond exp's range: the online softmax subtracts the running max."""
    q, k, v, meta, _ = make_case([700, 20], 6, 2, 32, 16, torch.float32, seed=3)
    check(native_op, q * 40, k * 40, v, meta, 1.0)


def test_strided_query_and_cache_views(native_op) -> None:
    """q sliced out of a wider projection and caches with a padded head stride: read through their strides."""
    q, k, v, meta, scale = make_case([50, 300], 9, 3, 64, 16, torch.float32, seed=5)
    wide_q = torch.randn(2, 12, 64)
    wide_q[:, 2:11] = q
    wide_k = torch.randn(k.shape[0], 4, 80)
    wide_k[:, 1:4, 8:72] = k
    wide_v = torch.randn(v.shape[0], 3, 72)
    wide_v[:, :, :64] = v
    qs, ks, vs = wide_q[:, 2:11], wide_k[:, 1:4, 8:72], wide_v[:, :, :64]
    assert not qs.is_contiguous() and not ks.is_contiguous() and not vs.is_contiguous()
    check(native_op, qs, ks, vs, meta, scale)


def test_op_rejects_what_it_cannot_read(native_op) -> None:
    q, k, v, meta, scale = make_case([10], 4, 2, 32, 4, torch.float32)
    bt, lens = meta.decode_block_table, meta.decode_context_lens
    with pytest.raises(RuntimeError, match="context_lens"):
        native_op(q, k, v, bt, lens + 100, 4, scale)  # past the block table
    with pytest.raises(RuntimeError, match="outside the cache"):
        native_op(q, k, v, bt + k.shape[0], lens, 4, scale)
    with pytest.raises(RuntimeError, match="one dtype"):
        native_op(q.double(), k, v, bt, lens, 4, scale)
    assert native_op(q[:0], k, v, bt[:0], lens[:0], 4, scale).shape == (0, 4, 32)


def test_head_dim_strides(native_op) -> None:
    """q and caches whose head dim is strided (a transposed copy): the op reads them through their strides (the
    caches through its fp32 row copies) rather than the wrapper falling back to the reference."""
    q, k, v, meta, scale = make_case([9, 30, 70], 4, 2, 32, 16, torch.float32, seed=2)
    kt, vt = (c.transpose(1, 2).contiguous().transpose(1, 2) for c in (k, v))  # head dim strided
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert kt.stride(-1) != 1 and qt.stride(-1) != 1
    check(native_op, qt, kt, vt, meta, scale)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, meta, scale = make_case([40, 3], 6, 3, 64, 16, dtype, seed=4)
        check(native_op, q, k.transpose(1, 2).contiguous().transpose(1, 2), v, meta, scale)


def test_wrapper_falls_back_to_reference(native_op) -> None:
    """What the op does not take (fp16, no block table) runs the reference."""
    q, k, v, meta, scale = make_case([9, 30], 4, 2, 32, 16, torch.float16, seed=2)
    got = cpu_attention.native_decode_attention(q, k, v, meta, scale)
    assert torch.equal(got, reference.decode_attention(q, k, v, meta, scale))
    q, k, v, meta, scale = make_case([9, 30], 4, 2, 32, 16, torch.float32, seed=2)
    meta.decode_block_table = None
    assert torch.equal(cpu_attention.native_decode_attention(q, k, v, meta, scale),
                       reference.decode_attention(q, k, v, meta, scale))


def _without_gather_view(meta: AttentionMetadata) -> AttentionMetadata:
    return AttentionMetadata(slot_mapping=meta.slot_mapping, num_decode=meta.num_decode, block_size=meta.block_size,
                             decode_block_table=meta.decode_block_table, decode_context_lens=meta.decode_context_lens)


@pytest.mark.parametrize("lens", [[1], [9, 30, 17], [64, 3]], ids=["1", "mixed", "block-multiple"])
def test_reference_builds_the_gather_view_from_the_block_table(lens) -> None:
    """Metadata with only the block table (what the runner gives a native or Triton op): the reference builds
    the runner's gather and mask itself, keeps them on the metadata, and computes the same attention."""
    q, k, v, meta, scale = make_case(lens, 4, 2, 32, 16, torch.float32, seed=4)
    lazy = _without_gather_view(meta)
    want = reference.decode_attention(q, k, v, meta, scale)
    assert torch.equal(reference.decode_attention(q, k, v, lazy, scale), want)
    assert torch.equal(lazy.decode_gather, meta.decode_gather) and torch.equal(lazy.decode_mask, meta.decode_mask)
    with pytest.raises(ValueError, match="block table"):
        AttentionMetadata(slot_mapping=meta.slot_mapping, num_decode=1).decode_gather_view()


def test_wrapper_fallback_without_a_gather_view(native_op) -> None:
    """fp16 (which the op does not take) on metadata with only the block table: the reference runs on the
    view it builds."""
    q, k, v, meta, scale = make_case([9, 30], 4, 2, 32, 16, torch.float16, seed=2)
    lazy = _without_gather_view(meta)
    assert torch.equal(cpu_attention.native_decode_attention(q, k, v, lazy, scale),
                       reference.decode_attention(q, k, v, meta, scale))
    assert lazy.decode_gather is not None


def test_native_kernel_set_uses_the_op(native_op) -> None:
    native = ops.kernel_set(ops.Backend("native", "native"))
    assert native.decode_attention is cpu_attention.native_decode_attention
    assert "decode_attention" in native.native_ops()
    assert ops.kernel_set(ops.REFERENCE).decode_attention is reference.decode_attention


@pytest.mark.parametrize("mode", ["none", "block"])
def test_engine_on_the_op_serves_the_reference_tokens(native_op, tmp_path, monkeypatch, mode) -> None:
    """The engine on the native backend runs its decode rows through the op and samples what the plain
    PyTorch reference model samples."""
    if not ops.select_backend("native", (torch.float32,)).native:
        pytest.skip("native backend unavailable here")
    folder, ref = write_tiny(tmp_path, tiny_config(mode, 2, layers=4))
    expected = [reference_greedy(ref, p, 8) for p in PROMPTS]
    calls = []

    def counted(*args):
        calls.append(args[0].shape[0])
        return native_op(*args)

    monkeypatch.setattr(cpu_attention, "_op", counted)
    llm = LLM(str(folder), max_model_len=64, max_num_batched_tokens=5, block_size=4, kernels="native")
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert calls and max(calls) > 1  # decode steps went through the op, batched

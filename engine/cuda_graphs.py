"""CUDA graphs for pure-decode steps, in vLLM's scheme.

A step whose rows all carry one new token (and record no depth weights) is padded to the next captured
batch size P and runs as one replay of the graph captured for P: the model forward and the logits, over
static buffers at fixed addresses (input ids, positions, slot mapping, the decode block table [P, max_blocks],
context lengths, the first P rows of the depth pool, the KV caches, and a logits buffer the graph writes).

Pad rows are harmless by construction: each writes its K/V into the scratch KV block (one block past the
block pool, never handed to a request), has context length 1 over that block, and its outputs are dropped.

Prefill and mixed steps, decode batches above the largest size, and steps recording depth weights run
eagerly. Capture needs a decode attention with fixed shapes and no host sync (a kernel set whose
`graph_safe_decode` is set, e.g. Triton's paged decode); the reference decode attention gathers a
data-dependent context and is not, so graphs are off with it (the start-up log line says why).

The padding itself does not need a GPU: ModelRunner.use_padded_decode runs the same padded static batch
eagerly (on any device), which is how the CPU tests check it gives exactly the unpadded greedy tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from engine.config import DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE
from kernels.ops import KernelSet
from models.context import ForwardBatch

logger = logging.getLogger("depthserve.cudagraph")

WARMUP_RUNS = 2  # eager runs of each size on the capture stream before capturing it (cuBLAS/Triton set-up)


def capture_sizes(max_num_seqs: int, max_step_tokens: int, limit: int | None = None) -> list[int]:
    """Decode batch sizes to capture: 1, 2, 4, 8, then steps of 8, up to the cap, and the cap itself.

    The cap is `limit` (None: min(max_num_seqs, 256)), never above max_num_seqs (no larger decode batch
    exists) nor max_step_tokens (the input buffers and the depth pool hold that many rows)."""
    cap = min(limit if limit is not None else DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE, max_num_seqs, max_step_tokens)
    if cap < 1:
        return []
    sizes = [s for s in (1, 2, 4, *range(8, cap + 1, 8)) if s <= cap]
    if sizes[-1] != cap:
        sizes.append(cap)
    return sizes


def padded_size(sizes: Sequence[int], num_rows: int) -> int | None:
    """The smallest size in `sizes` (ascending) that holds `num_rows`, or None (the step runs unpadded)."""
    return next((s for s in sizes if s >= num_rows), None)


def graphs_off_reason(device: torch.device | str, enforce_eager: bool, tensor_parallel_size: int,
                      kernels: KernelSet, backend_name: str) -> str | None:
    """Why decode steps cannot be captured here, or None when they can."""
    if torch.device(device).type != "cuda":
        return f"device is {torch.device(device).type}"
    if enforce_eager:
        return "--enforce-eager"
    if tensor_parallel_size > 1:
        return "tensor-parallel ranks run eagerly"
    if not kernels.graph_safe_decode:
        return (f"kernels {backend_name!r} have no capture-safe decode attention (the reference gathers a "
                "data-dependent context); graphs need one, e.g. --kernels triton")
    return None


class DecodeGraphs:
    """One torch.cuda.CUDAGraph per padded decode batch size, sharing one memory pool; CUDA only.

    `body(batch, out)` runs the forward and writes the logits of the batch's rows into `out` ([P, vocab] fp32,
    a view of a buffer allocated once outside the graph pool). Graph outputs therefore never live in the pool,
    and the pool is reused across sizes: captured largest first, each smaller capture fits in what the larger
    ones freed."""

    def __init__(self, device: torch.device, max_rows: int, vocab: int) -> None:
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.device = device
        self.logits = torch.zeros(max_rows, vocab, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool: tuple[int, int] | None = None
        self.memory_bytes = 0  # reserved by the capture (graph pool, workspaces), for the start-up log

    @property
    def sizes(self) -> list[int]:
        return sorted(self.graphs)

    def capture(self, sizes: Sequence[int], make_batch: Callable[[int], ForwardBatch],
                release: Callable[[], None], body: Callable[[ForwardBatch, torch.Tensor], None]) -> None:
        """Capture every size, largest first. `make_batch(p)` returns the static batch of p rows (lending depth
        rows that `release()` returns); its buffers must hold valid pad content (scratch slot, length 1)."""
        before = torch.cuda.memory_reserved(self.device)
        torch.cuda.synchronize(self.device)
        self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        with torch.inference_mode():
            for p in sorted(set(sizes), reverse=True):
                batch = make_batch(p)
                out = self.logits[:p]
                try:
                    # warm up on the side stream the capture uses (lazy initialisation, autotuning, cuBLAS
                    # handles and workspaces all happen here, outside the capture)
                    stream.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(stream):
                        for _ in range(WARMUP_RUNS):
                            body(batch, out)
                    torch.cuda.current_stream(self.device).wait_stream(stream)
                    torch.cuda.synchronize(self.device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                        body(batch, out)
                    self.graphs[p] = graph
                finally:
                    release()
        torch.cuda.synchronize(self.device)
        self.memory_bytes = torch.cuda.memory_reserved(self.device) - before

    def replay(self, p: int) -> torch.Tensor:
        """Run the graph of size p over what the static buffers hold now: logits [p, vocab] (a view that the
        next replay overwrites; read it before then)."""
        self.graphs[p].replay()
        return self.logits[:p]

"""Persistent, preallocated per-step inputs (vLLM's InputBatch, at nano-vllm's size).

Each running request owns one row of a block table that is allocated once at start-up and updated from
the KV manager's diffs (blocks appended since the last step), not rebuilt from Python lists every step;
token ids, positions and slot mapping are views of buffers sized for the largest step. This is the form
fused kernels and CUDA graphs need: fixed addresses, sizes known at start-up.

The block table and the step's per-token lists are built on the host; on CUDA the per-token buffers are
pinned staging tensors, copied once per step (non-blocking) into device tensors of the same size.

A padded decode step (engine/cuda_graphs.py) also fills `decode_table` [R, nb] and `context_lens` [R]: the
block-table rows and context lengths of its decode rows, padded, uploaded into device buffers whose addresses
never change, so a CUDA graph captured over views of them reads each step's values.
"""

from __future__ import annotations

import torch


class InputBatch:
    def __init__(self, max_num_reqs: int, max_blocks_per_req: int, max_step_tokens: int, block_size: int,
                 device: torch.device | str = "cpu") -> None:
        self.block_size = block_size
        self.device = torch.device(device)
        self.block_table = torch.zeros(max_num_reqs, max_blocks_per_req, dtype=torch.long)  # [R, nb] host
        self.num_blocks = [0] * max_num_reqs  # valid entries per block-table row
        pin = self.device.type == "cuda"
        # host buffers (pinned on CUDA), written by the model runner each step
        self.input_ids = torch.zeros(max_step_tokens, dtype=torch.long, pin_memory=pin)  # [T_max]
        self.positions = torch.zeros(max_step_tokens, dtype=torch.long, pin_memory=pin)  # [T_max]
        self.slot_mapping = torch.zeros(max_step_tokens, dtype=torch.long, pin_memory=pin)  # [T_max]
        # their device copies (the same tensors on the CPU)
        self._device_bufs = [torch.zeros(max_step_tokens, dtype=torch.long, device=self.device) if pin else host
                             for host in (self.input_ids, self.positions, self.slot_mapping)]
        # padded decode steps: block-table rows and context lengths of the decode rows (host, then device)
        self.decode_table = torch.zeros(max_num_reqs, max_blocks_per_req, dtype=torch.long, pin_memory=pin)
        self.context_lens = torch.zeros(max_num_reqs, dtype=torch.int32, pin_memory=pin)
        self._decode_bufs = [torch.zeros_like(host, device=self.device) if pin else host
                             for host in (self.decode_table, self.context_lens)]
        self._uploaded: torch.cuda.Event | None = None  # recorded after the last step's copies
        self.row_of: dict[str, int] = {}
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))

    def sync_blocks(self, req_id: str, block_ids: list[int]) -> None:
        """Give the request a row if it has none, and append the blocks it gained since the last step."""
        row = self.row_of.get(req_id)
        if row is None:
            if not self._free_rows:
                raise RuntimeError("more running requests than block-table rows (max_num_seqs)")
            row = self.row_of[req_id] = self._free_rows.pop()
            self.num_blocks[row] = 0
        have = self.num_blocks[row]
        if len(block_ids) < have:
            raise RuntimeError(f"request {req_id!r} lost KV blocks without leaving the batch")
        if len(block_ids) > have:
            self.block_table[row, have:len(block_ids)] = torch.tensor(block_ids[have:], dtype=torch.long)
            self.num_blocks[row] = len(block_ids)

    def truncate(self, req_id: str, num_blocks: int) -> None:
        """The request gave back its blocks past `num_blocks` (a speculative step's rejected drafts): the next
        sync_blocks writes whatever it holds there afresh."""
        row = self.row_of.get(req_id)
        if row is not None:
            self.num_blocks[row] = min(self.num_blocks[row], num_blocks)

    def wait_for_upload(self) -> None:
        """Before the host buffers are rewritten: the previous step's copies out of them have finished."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
            self._uploaded = None

    def upload(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, positions, slot_mapping of this step's first `num_tokens` rows, on the device."""
        return self._upload((self.input_ids, self.positions, self.slot_mapping), self._device_bufs,
                            num_tokens)  # type: ignore[return-value]

    def upload_decode(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """decode_table, context_lens of the first `num_rows` rows, on the device (views at fixed addresses)."""
        return self._upload((self.decode_table, self.context_lens), self._decode_bufs,
                            num_rows)  # type: ignore[return-value]

    def device_views(self, n: int) -> tuple[torch.Tensor, ...]:
        """The first `n` rows of the device buffers, without copying: input_ids, positions, slot_mapping,
        decode_table, context_lens (what a captured CUDA graph of n decode rows reads)."""
        return tuple(d[:n] for d in (*self._device_bufs, *self._decode_bufs))

    def _upload(self, hosts: tuple[torch.Tensor, ...], devs: list[torch.Tensor], n: int) -> tuple[torch.Tensor, ...]:
        if self.device.type != "cuda":
            return tuple(h[:n] for h in hosts)
        outs = tuple(d[:n].copy_(h[:n], non_blocking=True) for h, d in zip(hosts, devs, strict=True))
        self._uploaded = torch.cuda.Event()  # after every copy so far on this stream
        self._uploaded.record()
        return outs

    def remove(self, req_id: str) -> None:
        """A request that finished, or was preempted (its blocks are gone): free its row."""
        row = self.row_of.pop(req_id, None)
        if row is not None:
            self.num_blocks[row] = 0
            self._free_rows.append(row)

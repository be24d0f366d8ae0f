"""Persistent, preallocated per-step inputs (vLLM's InputBatch, at nano-vllm's size).

Each running request owns one row of a block table that is allocated once at start-up and updated from
the KV manager's diffs (blocks appended since the last step), not rebuilt from Python lists every step;
token ids, positions and slot mapping are views of buffers sized for the largest step. This is the form
fused kernels and CUDA graphs need: fixed addresses, sizes known at start-up.
"""

from __future__ import annotations

import torch


class InputBatch:
    def __init__(self, max_num_reqs: int, max_blocks_per_req: int, max_step_tokens: int, block_size: int) -> None:
        self.block_size = block_size
        self.block_table = torch.zeros(max_num_reqs, max_blocks_per_req, dtype=torch.long)  # [R, nb]
        self.num_blocks = [0] * max_num_reqs  # valid entries per block-table row
        self.input_ids = torch.zeros(max_step_tokens, dtype=torch.long)  # [T_max]
        self.positions = torch.zeros(max_step_tokens, dtype=torch.long)  # [T_max]
        self.slot_mapping = torch.zeros(max_step_tokens, dtype=torch.long)  # [T_max]
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

    def remove(self, req_id: str) -> None:
        """A request that finished, or was preempted (its blocks are gone): free its row."""
        row = self.row_of.pop(req_id, None)
        if row is not None:
            self.num_blocks[row] = 0
            self._free_rows.append(row)

"""Tensor parallelism over torch.distributed: rank 0 is the engine process, ranks 1..N-1 are workers.

Each step rank 0 broadcasts the packed batch (token ids, positions, slot mapping, attention
metadata); every rank runs the same forward on its weight and KV shards, with all-reduce after the
row-parallel linears and an all-gather of the vocab-parallel logits. Only rank 0 samples.

On the CPU every group is gloo. On CUDA rank r runs on cuda:r and the compute group is NCCL; the batch's
structure (shapes, dtypes, Python fields) still goes over a gloo control group, and its tensors follow
over the compute group straight from device to device (no pickling of device tensors, no host copies).

The AttnRes depth pool is replicated: the depth states are sums of sublayer outputs, which are
already all-reduced, so every rank holds the full [T, N+1, d] pool and needs no extra communication.

A watchdog notices a worker that exits; gloo raises on a dead peer and times out on a hung one, so
the engine fails fast with WorkerDiedError instead of hanging.

On CUDA with --gpu-memory-utilization every rank profiles the same peak step together (its collectives pair
up) and the KV cache gets the fewest blocks any rank has room for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.memory import kv_blocks_for, profile_step
from engine.model_runner import allocate_kv, kv_bytes_per_block, kv_slots
from kernels import hugepages
from kernels.ops import REFERENCE, Backend
from kvcache.depth_cache import DepthCache
from models.attn_res import depth_pool_spec
from models.context import ForwardBatch
from models.loader import load_config, load_model

logger = logging.getLogger("depthserve.parallel")
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)  # compute collectives: a hung peer fails the step
IDLE_TIMEOUT = datetime.timedelta(days=365)  # workers waiting for the next batch may wait indefinitely


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker exited or stopped answering: the engine cannot continue."""


class DistCommunicator:
    """models.context.Communicator over the default torch.distributed process group."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


LOOPBACK = "127.0.0.1"


def loopback_listener() -> socket.socket:
    """The rendezvous store's socket, bound to loopback by us: TCPStore binds its own on every interface."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    return sock


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n in ("lo", "lo0")), next((n for n in names if n.startswith("lo")), None))


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    model_dir: Path
    dtype: torch.dtype
    num_kv_blocks: int | None  # None: profile, with --gpu-memory-utilization, together with rank 0 (CUDA)
    block_size: int
    depth_tokens: int
    num_threads: int | None
    max_model_len: int | None = None  # sizes the rotary table
    kernels: Backend = REFERENCE  # the op backend rank 0 resolved (kernels.ops): every rank runs the same ops
    device: str = "cpu"  # cpu (gloo) or cuda (NCCL, rank r on cuda:r)
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 1  # rows of logits the profile step computes
    quantization: str = "auto"  # which weights are served quantized (models/quantization.py)
    int8_activations: bool = False  # --quant-activations int8 (LlamaForServing.prepare_for_inference)


def rank_device(device: str, rank: int) -> torch.device:
    """Where rank `rank` runs: cuda:rank on CUDA (one GPU per rank), else the CPU."""
    return torch.device("cuda", rank) if torch.device(device).type == "cuda" else torch.device("cpu")


def _init(rank: int, world: int, port: int, listener: socket.socket | None = None,
          device: str = "cpu") -> dist.ProcessGroup:
    """Join the default group (compute collectives: NCCL on CUDA, gloo on CPU) and return a gloo control
    group for batch broadcasts.

    The control group has no practical timeout, so an idle server keeps its workers; a dead peer
    still fails it at once (its sockets close). Every rank listens on loopback only: rank 0's store on
    `listener` (see loopback_listener), gloo's pair sockets on the loopback interface, which gloo would
    otherwise pick from the host name (often a public address) unless GLOO_SOCKET_IFNAME names one.
    """
    if "GLOO_SOCKET_IFNAME" not in os.environ and (lo := _loopback_interface()) is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = lo  # read when the gloo groups are created, in this process
    dev = rank_device(device, rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before NCCL: each rank's communicator binds to its own GPU
    store = dist.TCPStore(LOOPBACK, port, world, is_master=rank == 0, timeout=COLLECTIVE_TIMEOUT,
                          wait_for_workers=False,  # the store owns a copy of the fd: the caller closes its own
                          master_listen_fd=os.dup(listener.fileno()) if listener is not None else None)
    # NCCL binds its communicator lazily, to the current device set above (vLLM's pattern: an NCCL device
    # group for the tensors, a gloo group for Python objects)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


# ---- the batch broadcast: structure over the control group, tensors over the compute group ----------------
@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor of the broadcast batch, by its place in the list that follows."""

    index: int


def pack_tensors(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """`obj` with every tensor (in dataclasses, lists, tuples) replaced by a _TensorRef; tensors appended."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _TensorRef(len(tensors) - 1)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: pack_tensors(getattr(obj, f.name), tensors)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, list | tuple):
        return type(obj)(pack_tensors(x, tensors) for x in obj)
    return obj


def unpack_tensors(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of pack_tensors, given the received tensors."""
    if isinstance(obj, _TensorRef):
        return tensors[obj.index]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: unpack_tensors(getattr(obj, f.name), tensors)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, list | tuple):
        return type(obj)(unpack_tensors(x, tensors) for x in obj)
    return obj


def send_batch(batch: ForwardBatch | None, control: dist.ProcessGroup | None) -> None:
    """Rank 0: the batch's structure and tensor shapes over `control`, then each tensor over the default group."""
    if batch is None:
        dist.broadcast_object_list([None], src=0, group=control)
        return
    tensors: list[torch.Tensor] = []
    payload = pack_tensors(dataclasses.replace(batch, kv_caches=[], depth=None), tensors)
    tensors = [t.contiguous() for t in tensors]
    specs = [(t.dtype, tuple(t.shape)) for t in tensors]
    dist.broadcast_object_list([(payload, specs)], src=0, group=control)
    for t in tensors:
        if t.numel():
            dist.broadcast(t, src=0)


def recv_batch(control: dist.ProcessGroup, device: torch.device) -> ForwardBatch | None:
    """Ranks > 0: the next batch (its tensors on `device`), or None when rank 0 stops the group."""
    box: list = [None]
    dist.broadcast_object_list(box, src=0, group=control)
    if box[0] is None:
        return None
    payload, specs = box[0]
    tensors = [torch.empty(shape, dtype=dtype, device=device) for dtype, shape in specs]
    for t in tensors:
        if t.numel():
            dist.broadcast(t, src=0)
    return unpack_tensors(payload, tensors)


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest `value` any rank holds (an all-reduce on the compute group; every rank calls it)."""
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _barrier(device: torch.device) -> None:
    dist.barrier(**({"device_ids": [device.index]} if device.type == "cuda" else {}))


def _parent_logging() -> tuple[int, str | None]:
    """The root logger's level and format, so a spawned worker logs in the server's one format."""
    root = logging.getLogger()
    fmt = next((h.formatter._fmt for h in root.handlers if h.formatter is not None), None)
    return root.level, fmt


def _worker_main(rank: int, world: int, port: int, spec: WorkerSpec,
                 log: tuple[int, str | None] = (logging.WARNING, None)) -> None:
    """One TP rank > 0: load its shard, then run every broadcast batch until told to stop."""
    if log[1] is not None:
        logging.basicConfig(level=log[0], format=log[1])
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    dev = rank_device(spec.device, rank)
    control = _init(rank, world, port, device=spec.device)
    comm = DistCommunicator(rank, world)
    cfg = load_config(spec.model_dir)
    model = load_model(spec.model_dir, spec.dtype, comm, cfg=cfg, max_model_len=spec.max_model_len, device=dev,
                       quantization=spec.quantization)
    model.prepare_for_inference(spec.kernels, spec.int8_activations)
    pool_spec = depth_pool_spec(cfg, spec.dtype)
    depth = DepthCache(pool_spec, spec.depth_tokens, device=dev) if pool_spec is not None else None
    num_blocks = spec.num_kv_blocks
    if num_blocks is None:  # rank 0 profiles the same step now (LLMEngine._profile_kv_blocks)
        prof = profile_step(model, depth, spec.depth_tokens, spec.max_num_seqs, spec.block_size)
        per_block = kv_bytes_per_block(cfg, spec.dtype, spec.block_size, world)
        num_blocks = min_over_ranks(kv_blocks_for(prof, spec.gpu_memory_utilization, per_block), dev)
    _barrier(dev)
    # too few blocks: rank 0 reports it and stops the group; one block keeps this rank valid until then
    kv = allocate_kv(model, kv_slots(max(num_blocks, 1), spec.block_size))
    if dev.type == "cpu":
        hugepages.back_model(model, [t for pair in kv for t in pair] + (depth.tensors() if depth is not None else []))
    try:
        while True:
            batch = recv_batch(control, dev)
            if batch is None:
                break
            t = int(batch.input_ids.shape[0])
            batch = dataclasses.replace(batch, kv_caches=kv, depth=depth.reserve(t) if depth else None)
            try:
                with torch.inference_mode():
                    for _ in model.logits_pieces(model(batch)):  # the all-gathers rank 0 makes
                        pass
            finally:
                if depth is not None:
                    depth.release()
    finally:
        dist.destroy_process_group()


class TPGroup:
    """Rank 0's handle on the workers: start them, broadcast batches, watch them, stop them."""

    def __init__(self, world: int, spec: WorkerSpec) -> None:
        self.world = world
        self.dead: str | None = None
        self._stopping = False
        self._listener = loopback_listener()
        port = int(self._listener.getsockname()[1])
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_worker_main, args=(r, world, port, spec, _parent_logging()), daemon=True,
                                  name=f"depthserve-tp{r}") for r in range(1, world)]
        for p in self.procs:
            p.start()
        self.device = rank_device(spec.device, 0)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # rank 0 is cuda:0 (the rendezvous thread sets its own, too)
        self._rendezvous(world, port, spec.device)
        self._listener.close()  # the store listens on its own copy
        self.comm = DistCommunicator(0, world)
        self._watchdog = threading.Thread(target=self._watch, name="depthserve-tp-watchdog", daemon=True)
        self._watchdog.start()

    def _rendezvous(self, world: int, port: int, device: str) -> None:
        """Join the process group, failing at once (not after the timeout) if a worker dies first."""
        errors: list[BaseException] = []
        self.control: dist.ProcessGroup | None = None

        def join() -> None:
            try:
                self.control = _init(0, world, port, self._listener, device)
            except BaseException as e:  # reported below
                errors.append(e)

        t = threading.Thread(target=join, daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.2)
            gone = [p for p in self.procs if not p.is_alive()]
            if gone and t.is_alive():
                self.shutdown()
                raise WorkerDiedError(f"tensor-parallel worker {gone[0].name} exited with code {gone[0].exitcode} "
                                      "during start-up (see its log above)")
        if errors:
            self.shutdown()
            raise WorkerDiedError(f"tensor-parallel workers failed to start: {errors[0]}") from errors[0]

    def ready(self) -> None:
        """Wait until every worker has loaded its shard (and profiled, when the KV cache is sized by profiling)."""
        _barrier(self.device)

    def min_over_ranks(self, value: int) -> int:
        """With the workers' own values (they call min_over_ranks in _worker_main): the smallest."""
        return min_over_ranks(value, self.device)

    def _watch(self) -> None:
        while not self._stopping:
            for p in self.procs:
                if not p.is_alive() and not self._stopping:
                    self.dead = f"tensor-parallel worker {p.name} (pid {p.pid}) exited with code {p.exitcode}"
                    logger.error(self.dead)
                    return
            time.sleep(0.2)

    def check(self) -> None:
        if self.dead:
            raise WorkerDiedError(self.dead)

    def broadcast(self, batch: ForwardBatch) -> None:
        self.check()
        send_batch(batch, self.control)

    def shutdown(self) -> None:
        """Stop workers (politely if they are healthy), then make sure none is left behind."""
        if self._stopping:
            return
        self._stopping = True
        if dist.is_initialized():
            if self.dead is None:
                try:
                    send_batch(None, self.control)
                except Exception:  # a peer is gone: fall through to terminate
                    logger.warning("could not tell TP workers to stop; terminating them")
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        self._listener.close()
        deadline = time.monotonic() + 5
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(2)
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, 9)
                p.join(1)

"""Tensor parallelism over torch.distributed: rank 0 is the engine process, ranks 1..N-1 are workers.

Each step rank 0 broadcasts the packed batch (token ids, positions, slot mapping, attention
metadata); every rank runs the same forward on its weight and KV shards, with all-reduce after the
row-parallel linears and an all-gather of the vocab-parallel logits. Only rank 0 samples.

The AttnRes depth pool is replicated: the depth states are sums of sublayer outputs, which are
already all-reduced, so every rank holds the full [T, N+1, d] pool and needs no extra communication.

A watchdog notices a worker that exits; gloo raises on a dead peer and times out on a hung one, so
the engine fails fast with WorkerDiedError instead of hanging.
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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.model_runner import allocate_kv
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
    num_kv_blocks: int
    block_size: int
    depth_tokens: int
    num_threads: int | None
    max_model_len: int | None = None  # sizes the rotary table
    kernels: Backend = REFERENCE  # the op backend rank 0 resolved (kernels.ops): every rank runs the same ops


def _init(rank: int, world: int, port: int, listener: socket.socket | None = None) -> dist.ProcessGroup:
    """Join the default group (compute collectives) and return a control group for batch broadcasts.

    The control group has no practical timeout, so an idle server keeps its workers; a dead peer
    still fails it at once (its sockets close). Every rank listens on loopback only: rank 0's store on
    `listener` (see loopback_listener), gloo's pair sockets on the loopback interface, which gloo would
    otherwise pick from the host name (often a public address) unless GLOO_SOCKET_IFNAME names one.
    """
    if "GLOO_SOCKET_IFNAME" not in os.environ and (lo := _loopback_interface()) is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = lo  # read when the gloo groups are created, in this process
    store = dist.TCPStore(LOOPBACK, port, world, is_master=rank == 0, timeout=COLLECTIVE_TIMEOUT,
                          wait_for_workers=False,  # the store owns a copy of the fd: the caller closes its own
                          master_listen_fd=os.dup(listener.fileno()) if listener is not None else None)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def _worker_main(rank: int, world: int, port: int, spec: WorkerSpec) -> None:
    """One TP rank > 0: load its shard, then run every broadcast batch until told to stop."""
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    control = _init(rank, world, port)
    comm = DistCommunicator(rank, world)
    cfg = load_config(spec.model_dir)
    model = load_model(spec.model_dir, spec.dtype, comm, cfg=cfg, max_model_len=spec.max_model_len)
    model.prepare_for_inference(spec.kernels)
    kv = allocate_kv(model, spec.num_kv_blocks * spec.block_size)
    pool_spec = depth_pool_spec(cfg, spec.dtype)
    depth = DepthCache(pool_spec, spec.depth_tokens) if pool_spec is not None else None
    dist.barrier()
    try:
        while True:
            box: list = [None]
            dist.broadcast_object_list(box, src=0, group=control)
            batch: ForwardBatch | None = box[0]
            if batch is None:
                break
            t = int(batch.input_ids.shape[0])
            batch = dataclasses.replace(batch, kv_caches=kv, depth=depth.reserve(t) if depth else None)
            try:
                with torch.inference_mode():
                    model.compute_logits(model(batch))
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
        self.procs = [ctx.Process(target=_worker_main, args=(r, world, port, spec), daemon=True,
                                  name=f"depthserve-tp{r}") for r in range(1, world)]
        for p in self.procs:
            p.start()
        self._rendezvous(world, port)
        self._listener.close()  # the store listens on its own copy
        self.comm = DistCommunicator(0, world)
        self._watchdog = threading.Thread(target=self._watch, name="depthserve-tp-watchdog", daemon=True)
        self._watchdog.start()

    def _rendezvous(self, world: int, port: int) -> None:
        """Join the process group, failing at once (not after the timeout) if a worker dies first."""
        errors: list[BaseException] = []
        self.control: dist.ProcessGroup | None = None

        def join() -> None:
            try:
                self.control = _init(0, world, port, self._listener)
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
        """Wait until every worker has loaded its shard."""
        dist.barrier()

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
        payload = dataclasses.replace(batch, kv_caches=[], depth=None)
        dist.broadcast_object_list([payload], src=0, group=self.control)

    def shutdown(self) -> None:
        """Stop workers (politely if they are healthy), then make sure none is left behind."""
        if self._stopping:
            return
        self._stopping = True
        if dist.is_initialized():
            if self.dead is None:
                try:
                    dist.broadcast_object_list([None], src=0, group=self.control)
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

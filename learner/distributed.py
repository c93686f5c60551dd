"""``pirl-learner`` under ``torchrun``: one learner, its updates data-parallel over N processes (torch.distributed).

    torchrun --nproc_per_node N --no-python pirl-learner --device=cuda <the usual flags>

Who does what, and why:

- Rank 0 is the learner as it runs alone: the gRPC service, the write-ahead log, the rollout store, the
  checkpoints, publishing, the evaluator. Robots see one learner at one address; nothing about intake, acks or
  versions depends on the world size. (Sharding ingest over the ranks would need every rank to listen, a
  robot->rank mapping and a distributed ack/WAL protocol, for a part that is not the bottleneck: the update is.)
- The other ranks hold a replica of the policy and its optimizers and only take part in updates
  (:func:`follow`): rank 0 turns the episodes into the batch and broadcasts it as tensors (a JSON header of
  names, dtypes and shapes in a uint8 tensor, then the tensors; never pickle: the batch came off the network),
  with its torch RNG state, so that every rank draws the same minibatch order.
- Each rank computes the advantages over the whole batch (the same numbers everywhere: global statistics), and
  evaluates a contiguous slice of every minibatch (:class:`RankSlice`, the algorithm's ``shard`` hook). Its
  losses are weighted by its share of the minibatch and the gradients summed over the ranks (all_reduce over
  flat buckets), so the clipped, stepped gradient is the one-process gradient of the whole minibatch, slices
  equal or not. This is data parallelism as DDP does it, written out: the update calls
  ``policy.evaluate_chains``, not ``forward``, which DDP's wrapper cannot see.
- Checkpoints are rank 0's, consolidated, in LeRobot's layout: the same files as a one-process learner's, so
  ``--resume`` works at any world size. On resume every rank loads the checkpoint rank 0 picked.
- Rank 0 broadcasts STOP when its update loop ends (stop signal, max_updates, target reached); a keepalive
  while it waits for episodes keeps the collectives' timeout meaningful (a dead rank 0 is noticed).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, fields
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lerobot_policy_pi_rl.rollout import RolloutBatch

log = logging.getLogger(__name__)

STRATEGIES = ("ddp",)
# commands rank 0 broadcasts to the others, one int64 each
NOOP, UPDATE, STOP = 0, 1, 2
_BUCKET_BYTES = 64 << 20  # gradients are summed in flat buckets of at most this size (as DDP's buckets)


@dataclass
class DistributedConfig:
    """The learner under ``torchrun`` (``--distributed.<field>``); ignored when it runs as one process."""

    # how the update is parallelised: 'ddp' (every rank holds the whole policy and optimizers, each evaluates a
    # slice of every minibatch, gradients summed over ranks). FSDP2 (sharded parameters) is not available yet
    strategy: str = "ddp"
    # seconds a rank waits in one collective (the next batch, a gradient sum) before it fails; rank 0 sends a
    # keepalive every third of it while it waits for episodes, so only a dead or stuck rank reaches it
    timeout_s: float = 1800.0

    def __post_init__(self):
        if self.strategy == "fsdp2":
            raise ValueError(
                "distributed.strategy: fsdp2 is not implemented yet (docs/scale.md says why); use 'ddp', which "
                "needs the trained set and its optimizer state to fit one GPU"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy: must be one of {STRATEGIES} (got {self.strategy!r})")
        if self.timeout_s <= 0:
            raise ValueError(f"distributed.timeout_s: must be > 0 (got {self.timeout_s})")


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_device(device: str) -> str:
    """The device of this rank: 'cuda' (or 'cuda:k') becomes cuda:LOCAL_RANK (one GPU per rank); else unchanged."""
    if device.startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


class Group:
    """This process's place in the group and the collectives the learner uses.

    Only rank 0's update thread (and, before it starts, the main thread) issues collectives on rank 0, so every
    rank issues them in the same order."""

    def __init__(self, device: str, timeout_s: float = 1800.0):
        self.device = torch.device(device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():  # env:// from torchrun's RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.keepalive_s = timeout_s / 3
        self._last_sent = time.monotonic()
        log.info("rank %d of %d on %s (%s)", self.rank, self.world, self.device, backend)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # --- small messages -------------------------------------------------------------------------

    def _ints(self, values: list[int] | None, n: int) -> list[int]:
        t = torch.tensor(values if self.leader else [0] * n, dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return [int(x) for x in t.tolist()]

    def command(self, cmd: int | None = None) -> int:
        """Rank 0 sends ``cmd``; every rank returns it."""
        self._last_sent = time.monotonic()
        return self._ints([cmd] if self.leader else None, 1)[0]

    def keepalive(self) -> None:
        """Rank 0, while it waits for episodes: a NOOP now and then, so the others' collective never times out."""
        if time.monotonic() - self._last_sent >= self.keepalive_s:
            self.command(NOOP)

    def checkpoint(self, name: int | None = None) -> int | None:
        """Rank 0 sends the number of the checkpoint it resumed from (None: a fresh start); every rank returns it."""
        v = self._ints([-1 if name is None else name] if self.leader else None, 1)[0]
        return None if v < 0 else v

    # --- the batch: tensors only -----------------------------------------------------------------

    def _tensors(self, tensors: dict[str, Tensor] | None, meta: dict | None = None) -> tuple[dict[str, Tensor], dict]:
        """Broadcast named tensors from rank 0: a JSON header (names, dtypes, shapes, ``meta``) as a uint8
        tensor, its length first, then every tensor into a buffer of that shape. Bools travel as uint8 (not
        every backend reduces or sends bool)."""
        header = b""
        if self.leader:
            spec = [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()]
            header = json.dumps({"tensors": spec, "meta": meta or {}}).encode()
        (length,) = self._ints([len(header)] if self.leader else None, 1)
        buf = (
            torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device)
            if self.leader
            else torch.empty(length, dtype=torch.uint8, device=self.device)
        )
        dist.broadcast(buf, src=0)
        head = json.loads(buf.cpu().numpy().tobytes().decode())
        out = {}
        for name, dtype, shape in head["tensors"]:
            want = getattr(torch, dtype)
            if not isinstance(want, torch.dtype):
                raise ValueError(f"broadcast header names no torch dtype: {dtype!r}")
            wire = torch.uint8 if want == torch.bool else want
            if self.leader:
                t = tensors[name].to(self.device, wire).contiguous()
            else:
                t = torch.empty(shape, dtype=wire, device=self.device)
            dist.broadcast(t, src=0)
            out[name] = t.bool() if want == torch.bool else t
        return out, head["meta"]

    def update(self, batch: RolloutBatch | None = None) -> RolloutBatch:
        """Rank 0: send UPDATE, the batch and its torch RNG state. Every rank returns the batch, with rank 0's
        RNG state set, so every rank draws the same minibatch order as rank 0 (as one process would)."""
        if self.leader:
            self.command(UPDATE)
        sent = None
        meta = None
        if self.leader:
            sent = {f"obs/{k}": v for k, v in batch.observations.items()}
            for f in fields(batch):
                v = getattr(batch, f.name)
                if isinstance(v, Tensor):
                    sent[f.name] = v
            sent["rng"] = torch.get_rng_state()
            meta = {"env_steps": int(batch.env_steps)}
        got, meta = self._tensors(sent, meta)
        if self.leader:
            return batch
        torch.set_rng_state(got.pop("rng").cpu())
        obs = {k.removeprefix("obs/"): got.pop(k) for k in [k for k in got if k.startswith("obs/")]}
        # info (final observations, per-step env steps) is not read by the update: it stays on rank 0
        return RolloutBatch(observations=obs, env_steps=int(meta["env_steps"]), **got)

    def sync_state(self, module: nn.Module) -> None:
        """Every rank takes rank 0's parameters and buffers, then checks them: replicas start identical (a
        fresh start builds each from the same files and seed; this makes it certain, and says so if not)."""
        state = module.state_dict()
        with torch.no_grad():
            for _, t in sorted(state.items()):
                if t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.uint8):
                    buf = t.detach().to(self.device).contiguous()
                    dist.broadcast(buf, src=0)
                    t.copy_(buf.to(t.device))
        self.check_same(module)

    def check_same(self, module: nn.Module) -> None:
        """Raise when this rank's parameters differ from rank 0's (a checksum, all ranks compared)."""
        with torch.no_grad():
            sums = [p.detach().double().sum() for p in module.parameters()]
            local = (
                torch.stack(sums).to(self.device) if sums else torch.zeros(1, device=self.device, dtype=torch.double)
            )
        ref = local.clone()
        dist.broadcast(ref, src=0)
        ok = torch.tensor([int(torch.equal(local, ref))], device=self.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not int(ok.item()):
            raise RuntimeError("the policy replicas differ between ranks (parameter checksums do not match rank 0's)")


class RankSlice:
    """The algorithm's ``shard`` hook under torch.distributed (``lerobot_policy_pi_rl.algorithm.WholeMinibatch``
    in one process): rank r evaluates the r-th contiguous slice of every minibatch (sizes differ by at most one),
    its losses weighted by ``len(slice) / len(minibatch)``; gradients and diagnostics are summed over ranks. The
    sum of the weighted per-slice means is the minibatch mean, so the summed gradient is the whole minibatch's."""

    def __init__(self, group: Group):
        self.group = group

    def part(self, idx: Tensor) -> tuple[Tensor, float]:
        n, r, w = idx.numel(), self.group.rank, self.group.world
        lo, hi = r * n // w, (r + 1) * n // w
        if hi == lo:
            # a minibatch smaller than the world: this rank has no rows, but it must still join the collectives.
            # It evaluates one row at weight 0: its gradients are zeros on the same parameters as the others'
            return idx[:1], 0.0
        return idx[lo:hi], (hi - lo) / n

    def sum_grads(self, params: list[nn.Parameter]) -> None:
        # only parameters with a gradient: the same set on every rank (the same code path, the same config);
        # each once (a parameter listed twice must not be summed twice)
        grads = list({id(p): p.grad for p in params if p.grad is not None}.values())
        bucket: list[Tensor] = []
        size = 0
        for g in grads:
            if bucket and (size + g.numel() * g.element_size() > _BUCKET_BYTES or g.dtype != bucket[0].dtype):
                self._sum_bucket(bucket)
                bucket, size = [], 0
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket:
            self._sum_bucket(bucket)

    def _sum_bucket(self, grads: list[Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.group.device)
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g).to(g.device))
            offset += g.numel()

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.group.device)
        dist.all_reduce(t)
        return [float(x) for x in t.tolist()]


def check_supported(algorithm_config) -> None:
    """ValueError for what the data-parallel update does not do (yet), before any collective is started."""
    if algorithm_config.bc_coef > 0:
        # the BC term's data (interventions as they arrive, the offline set) lives on rank 0; splitting its
        # batches over the ranks is the missing piece (docs/scale.md)
        raise ValueError(
            "algorithm.bc_coef > 0 under torchrun: the BC term's data (interventions, the offline set) lives on "
            "rank 0 only; run the learner as one process, or set algorithm.bc_coef=0"
        )


def attach(algorithm, group: Group) -> None:
    """Make ``algorithm``'s updates data-parallel over ``group``."""
    check_supported(algorithm.config)
    algorithm.shard = RankSlice(group)


def follow(algorithm, group: Group, stopping: threading.Event | None = None) -> int:
    """The loop of ranks 1..N-1: run every update rank 0 sends until it sends STOP; returns the number of
    updates. ``stopping`` (set by a signal) is only logged: the rank leaves when rank 0 says STOP, so that no
    collective is left half done (rank 0 gets the same signal from torchrun)."""
    updates, noted = 0, False
    while True:
        cmd = group.command()
        if cmd == STOP:
            log.info("rank %d: rank 0 says stop after %d updates", group.rank, updates)
            return updates
        if cmd == UPDATE:
            stats = algorithm.update_on(group.update())
            updates += 1
            if stats.extra.get("skipped"):
                log.info("rank %d: update skipped, as on rank 0", group.rank)
        elif cmd != NOOP:
            raise RuntimeError(f"rank {group.rank}: unknown command {cmd} from rank 0")
        if stopping is not None and stopping.is_set() and not noted:
            log.info("rank %d: stop signal received; waiting for rank 0's STOP", group.rank)
            noted = True


def start_replicas(algorithm, group: Group) -> None:
    """Every rank, once its algorithm holds what it resumed from (rank 0 sent its checkpoint's number first,
    :meth:`Group.checkpoint`): wait for all (rank 0 prunes checkpoints only after every rank has read the one
    it picked), then take rank 0's weights and check them."""
    dist.barrier()
    group.sync_state(algorithm.policy)


def follow_until_stop(algorithm, group: Group) -> int:
    """Ranks 1..N-1 after :func:`start_replicas`: :func:`follow` with SIGTERM / SIGINT only noted (torchrun
    signals every rank; rank 0 finishes its update and sends STOP, and this rank leaves then)."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    return follow(algorithm, group, stopping)

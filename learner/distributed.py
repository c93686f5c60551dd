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
- ``--distributed.strategy=fsdp2`` (:class:`FSDP2Slice`): the same slices, with the trained modules, their
  gradients and optimizer states sharded by FSDP2; rank 0 keeps a plain inference copy for everything outside
  updates, refreshed (all-gathered) after each update, and checkpoints gather the optimizer states (SAVE).
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

STRATEGIES = ("ddp", "fsdp2")
# commands rank 0 broadcasts to the others, one int64 each (SAVE: fsdp2 only, every rank gathers the optimizer
# states for rank 0's checkpoint)
NOOP, UPDATE, STOP, SAVE = 0, 1, 2, 3
_BUCKET_BYTES = 64 << 20  # gradients are summed in flat buckets of at most this size (as DDP's buckets)


@dataclass
class DistributedConfig:
    """The learner under ``torchrun`` (``--distributed.<field>``); ignored when it runs as one process."""

    # how the update is parallelised: 'ddp' (every rank holds the whole policy and optimizers, each evaluates a
    # slice of every minibatch, gradients summed over ranks) or 'fsdp2' (the same slices, but the trained modules,
    # their gradients and optimizer states are sharded over the ranks with torch's fully_shard; rank 0 keeps one
    # full copy of the trained tensors for publishing, evaluation and checkpoints: docs/scale.md)
    strategy: str = "ddp"
    # seconds a rank waits in one collective (the next batch, a gradient sum) before it fails; rank 0 sends a
    # keepalive every third of it while it waits for episodes, so only a dead or stuck rank reaches it
    timeout_s: float = 1800.0

    def __post_init__(self):
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
            # every rank past its last collective before any connection closes: gloo aborts a process whose
            # peer tears the group down under a pending operation ("terminate called without an active
            # exception"); monitored, so a peer that died ends the wait after 30 s instead of the group timeout
            try:
                if self.device.type == "cpu":
                    dist.monitored_barrier(timeout=timedelta(seconds=30))
                else:  # nccl has no monitored barrier
                    dist.barrier()
            except Exception as e:  # noqa: BLE001  a peer gone already: tear down what is left
                log.warning("rank %d: not every rank reached the end (%s)", self.rank, e)
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

    def after_update(self, algorithm) -> None:
        """Every rank holds the whole updated policy already (see FSDP2Slice)."""

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


class FSDP2Slice(RankSlice):
    """``--distributed.strategy=fsdp2``: the slices and share weights of :class:`RankSlice`, with the trained
    modules sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``: DTensor parameters, each rank one shard of
    every trained tensor, of its gradient and of its AdamW moments). The frozen rest of the policy (the VLM)
    stays whole and replicated on every rank.

    - Gradients are reduce-scattered by FSDP in backward, averaged over the ranks (its default). The one-process
      gradient of the whole minibatch is the *sum* of the share-weighted slice gradients (RankSlice), so each
      rank's loss weight is its share times the world size (:meth:`part`), and the diagnostics, summed with the
      same weights, are divided by it again (:meth:`sum`). (A divide factor of 1 would say the same, but FSDP
      then reduces with PREMUL_SUM, which gloo does not have.) Grad-norm clipping over the DTensor gradients
      is the global norm.
    - Rank 0 uses the policy outside updates (values bootstrapped in episodes_to_batch, publishing, export,
      evaluation, save_pretrained). It does that on ``inference``: a plain copy of the policy made before the
      sharding, that shares the frozen parameters with the sharded one (no second VLM) and whose trained tensors
      are refreshed after every update (:meth:`after_update`: every rank all-gathers each trained tensor in
      turn, rank 0 copies it in). Cost: rank 0 holds one full copy of the trained set; what FSDP2 saves is the
      gradients and AdamW's two moments (3x the trained set) sharded, and the parameters sharded on ranks 1..N-1.
    - Checkpoints: rank 0 sends SAVE; every rank all-gathers the optimizer states (:meth:`consolidated`), and
      rank 0 writes them with the inference copy in LeRobot's layout, the files a one-process learner writes:
      ``--resume`` works at any world size and across ddp / fsdp2. A resumed checkpoint is loaded into the plain
      policy and optimizers before :meth:`setup` shards them."""

    def __init__(self, group: Group):
        super().__init__(group)
        self.inference: nn.Module | None = None  # rank 0's plain copy of the policy (after setup)
        self._view = None  # rank 0: a PiRLAlgorithm on the inference copy, what save_checkpoint writes

    @staticmethod
    def trained_modules(policy: nn.Module) -> list[nn.Module]:
        """Every module that owns trained parameters itself (children before parents): what is sharded, one
        FSDP unit each. Per module, not per block: FSDP gathers a unit's parameters when its own ``forward``
        runs, and the update does not go through the blocks' ``forward`` everywhere (LeRobot's pi0 runs its
        expert layer by layer through the layers' projections and norms). A module that owns trained and
        frozen parameters cannot be sharded as a unit: ValueError."""
        trained = {id(p) for p in [*policy.rl_actor_parameters(), *policy.rl_critic_parameters()]}
        found: list[nn.Module] = []

        def visit(module: nn.Module) -> None:
            for child in module.children():
                visit(child)
            own = [id(p) for p in module.parameters(recurse=False)]
            if own and all(i in trained for i in own):
                found.append(module)
            elif any(i in trained for i in own):
                raise ValueError(
                    f"distributed.strategy=fsdp2: {type(module).__name__} holds trained and frozen parameters, "
                    "so it cannot be sharded as one unit; use distributed.strategy=ddp"
                )

        visit(policy)
        return found

    def setup(self, algorithm) -> None:
        """Every rank, once the replicas are identical: the inference copy (rank 0), then shard the trained
        modules and move the optimizers (and any state they resumed with) onto the shards."""
        import copy

        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor

        policy = algorithm.policy
        trained = {id(p) for p in [*policy.rl_actor_parameters(), *policy.rl_critic_parameters()]}
        if self.group.leader:
            # the frozen parameters are the same objects in both (memo): only the trained set is copied
            memo = {id(p): p for p in policy.parameters() if id(p) not in trained}
            self.inference = copy.deepcopy(policy, memo).eval()
        old = {name: self._states(opt) for name, opt in algorithm.optimizers.items()}
        lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in algorithm.optimizers.items()}
        mesh = init_device_mesh(self.group.device.type, (self.group.world,))
        units = self.trained_modules(policy)
        for module in units:
            fully_shard(module, mesh=mesh)  # FSDP's default reduction: the mean over ranks (see part)
        algorithm.make_optimizers_and_scheduler()  # over the DTensor parameters now in the modules
        params = [p for opt in algorithm.optimizers.values() for g in opt.param_groups for p in g["params"]]
        log.info(
            "rank %d: fsdp2: %d trained modules sharded, this rank holds %d of their %d parameters",
            self.group.rank,
            len(units),
            sum(p.to_local().numel() for p in params),
            sum(p.numel() for p in params),
        )
        for name, opt in algorithm.optimizers.items():
            for g, lr in zip(opt.param_groups, lrs[name], strict=True):
                g["lr"] = lr
            params = [p for g in opt.param_groups for p in g["params"]]
            for p, state in zip(params, old[name], strict=True):
                if state:  # resumed AdamW moments: each rank keeps its shard (the same layout as the parameter)
                    opt.state[p] = {
                        k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                        if isinstance(v, Tensor) and v.shape == p.shape
                        else v
                        for k, v in state.items()
                    }

    @staticmethod
    def _states(opt) -> list[dict]:
        return [dict(opt.state.get(p, {})) for g in opt.param_groups for p in g["params"]]

    def part(self, idx: Tensor) -> tuple[Tensor, float]:
        rows, share = super().part(idx)
        return rows, share * self.group.world  # FSDP's mean over the ranks divides it by the world size again

    def sum(self, values: list[float]) -> list[float]:
        return [v / self.group.world for v in super().sum(values)]  # the same weights as part's

    def sum_grads(self, params: list[nn.Parameter]) -> None:
        """Nothing left to sum: FSDP reduce-scattered (averaged) the gradients in backward."""

    def after_update(self, algorithm) -> None:
        """Every rank, after each update: all-gather the trained tensors one at a time; rank 0 copies them into
        the inference copy (the others drop them at once)."""
        from torch.distributed.tensor import DTensor

        target = dict(self.inference.named_parameters()) if self.group.leader else {}
        with torch.no_grad():
            for name, p in algorithm.policy.named_parameters():
                if isinstance(p, DTensor):
                    full = p.full_tensor()
                    if self.group.leader:
                        target[name].copy_(full)

    def consolidated(self, algorithm):
        """Every rank (rank 0 after sending SAVE): gather the trained tensors and the optimizer states. Rank 0
        returns a plain PiRLAlgorithm on the inference copy that holds them (for ``save_checkpoint``); the
        others None. Call :meth:`release` after writing."""
        from torch.distributed.tensor import DTensor

        from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm

        self.after_update(algorithm)
        if self.group.leader and self._view is None:
            self._view = PiRLAlgorithm(self.inference, algorithm.config)
        view = self._view
        for name, opt in algorithm.optimizers.items():
            states = self._states(opt)
            into = [p for g in view.optimizers[name].param_groups for p in g["params"]] if view else []
            for i, state in enumerate(states):
                full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in sorted(state.items())}
                if view is not None and full:
                    view.optimizers[name].state[into[i]] = full
            if view is not None:
                for g, src in zip(view.optimizers[name].param_groups, opt.param_groups, strict=True):
                    g["lr"] = src["lr"]
        if view is None:
            return None
        view.num_updates = algorithm.num_updates
        view._optimization_step = algorithm._optimization_step
        return view

    def release(self) -> None:
        """Rank 0, after a checkpoint is written: drop the full optimizer states again."""
        if self._view is not None:
            for opt in self._view.optimizers.values():
                opt.state.clear()


def attach(algorithm, group: Group, strategy: str = "ddp") -> None:
    """Make ``algorithm``'s updates data-parallel over ``group`` (``strategy``: 'ddp' or 'fsdp2'; for fsdp2 the
    sharding itself happens in :func:`start_replicas`, after a resumed checkpoint is loaded)."""
    check_supported(algorithm.config)
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy: must be one of {STRATEGIES} (got {strategy!r})")
    algorithm.shard = FSDP2Slice(group) if strategy == "fsdp2" else RankSlice(group)


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
            algorithm.shard.after_update(algorithm)
            updates += 1
            if stats.extra.get("skipped"):
                log.info("rank %d: update skipped, as on rank 0", group.rank)
        elif cmd == SAVE:  # fsdp2: rank 0 checkpoints; this rank's shards of the optimizer states go to it
            algorithm.shard.consolidated(algorithm)
        elif cmd != NOOP:
            raise RuntimeError(f"rank {group.rank}: unknown command {cmd} from rank 0")
        if stopping is not None and stopping.is_set() and not noted:
            log.info("rank %d: stop signal received; waiting for rank 0's STOP", group.rank)
            noted = True


def start_replicas(algorithm, group: Group) -> None:
    """Every rank, once its algorithm holds what it resumed from (rank 0 sent its checkpoint's number first,
    :meth:`Group.checkpoint`): wait for all (rank 0 prunes checkpoints only after every rank has read the one
    it picked), then take rank 0's weights and check them; under fsdp2, then shard the trained modules."""
    dist.barrier()
    group.sync_state(algorithm.policy)
    if isinstance(algorithm.shard, FSDP2Slice):
        algorithm.shard.setup(algorithm)


def follow_until_stop(algorithm, group: Group) -> int:
    """Ranks 1..N-1 after :func:`start_replicas`: :func:`follow` with SIGTERM / SIGINT only noted (torchrun
    signals every rank; rank 0 finishes its update and sends STOP, and this rank leaves then)."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    return follow(algorithm, group, stopping)

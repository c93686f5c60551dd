"""Ranks of a 2-rank gloo group for tests/learner/test_fsdp2_update.py (``--distributed.strategy=fsdp2``),
started with ``torch.multiprocessing.spawn(run_rank, ...)``: what ``pirl-learner`` does on each rank under
torchrun (learner/main.py), with the trained modules sharded by FSDP2."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch
from safetensors.torch import save_file

from helpers.distributed_ranks import BATCH_1, BATCH_2, SEED, UPDATE_CASES, algorithm_config, make_batch, new_trainer


def run_rank(rank: int, world: int, port: int, root: str, job: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable(all_threads=True)  # a rank that aborts in C++ still shows where it was

    from learner.distributed import Group

    # rendezvous through a file, not a TCP port picked beforehand: nothing else on a busy machine can take it
    # between the pick and the bind (Group then finds the process group initialised)
    store = Path(root) / f"rendezvous-{job}-{port}"
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=300)
    )

    group = Group("cpu", timeout_s=300)
    try:
        {"update": _update, "save": _save, "resume": _resume}[job](group, Path(root))
    finally:
        group.close()


def _replica(group, pretrained: Path, **algo_kw):
    from learner.distributed import attach
    from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm
    from lerobot_policy_pi_rl.sft import load_policy

    policy, pre, post = load_policy(pretrained)
    algo = PiRLAlgorithm(policy, algorithm_config(**algo_kw))
    attach(algo, group, "fsdp2")
    return algo, pre, post


def _trained(algo) -> dict[str, torch.Tensor]:
    """Rank 0: the trained tensors of its inference copy (gathered from the shards after the update)."""
    return {k: v.clone() for k, v in algo.shard.inference.rl_state_dict().items()}


def _one_update(group, algo, batch_fn, trainer=None):
    """Rank 0 builds the batch, sends it, updates and gathers (as Trainer._update), optionally checkpoints, then
    sends STOP; the others run learner/distributed.py's follow loop. Rank 0's stats."""
    from learner.distributed import STOP, follow

    if not group.leader:
        assert follow(algo, group) == 1
        return None
    stats = algo.update_on(group.update(batch_fn()))
    algo.shard.after_update(algo)
    if trainer is not None:
        trainer.save()  # sends SAVE: rank 1 gathers its optimizer shards for rank 0
    group.command(STOP)
    return stats


def _update(group, root: Path) -> None:
    from torch.distributed.tensor import DTensor

    from learner.distributed import start_replicas

    for i, (kw, T, N) in enumerate(UPDATE_CASES):
        algo, _, _ = _replica(group, root / "sft", **kw)
        start_replicas(algo, group)
        # really sharded: every trained parameter is a DTensor, each rank holding part of it
        trained = [*algo.policy.rl_actor_parameters(), *algo.policy.rl_critic_parameters()]
        assert trained and all(isinstance(p, DTensor) for p in trained)
        assert sum(p.to_local().numel() for p in trained) < sum(p.numel() for p in trained)
        torch.manual_seed(SEED)
        stats = _one_update(group, algo, lambda: make_batch(algo.shard.inference or algo.policy, T, N, seed=i))  # noqa: B023
        if group.leader:
            save_file(_trained(algo), str(root / f"fsdp_update_{i}.safetensors"))
            (root / f"fsdp_update_{i}.json").write_text(json.dumps(stats.to_log_dict()))


def _save(group, root: Path) -> None:
    """One update at world size 2 under fsdp2, then rank 0 checkpoints as the Trainer does after an update."""
    from learner.distributed import start_replicas

    algo, pre, post = _replica(group, root / "sft")
    start_replicas(algo, group)
    trainer = None
    if group.leader:
        trainer = new_trainer(algo, pre, post, root / "fsdp_learner", group)
        trainer.version = 1
        trainer.store.set_version(1)
    torch.manual_seed(SEED)
    T, N, seed = BATCH_1
    _one_update(group, algo, lambda: make_batch(algo.shard.inference or algo.policy, T, N, seed), trainer)


def _resume(group, root: Path) -> None:
    """Resume the fsdp2 world-2 checkpoint at world size 2 under fsdp2, then the second update."""
    from learner.checkpoints import CheckpointPicker
    from learner.distributed import start_replicas
    from lerobot_policy_pi_rl.algorithm import load_checkpoint

    ckpts = root / "fsdp_learner" / "checkpoints"
    if group.leader:
        picker = CheckpointPicker(ckpts)
        algo, pre, post = picker.load(lambda c: _replica(group, c / "pretrained_model"))
        trainer = new_trainer(algo, pre, post, root / "fsdp_learner", group)
        assert trainer.resume(picker)
        group.checkpoint(int(picker.current().name))
    else:
        name = group.checkpoint()
        algo, _, _ = _replica(group, ckpts / f"{name:06d}" / "pretrained_model")
        load_checkpoint(ckpts / f"{name:06d}", algo)
    start_replicas(algo, group)
    T, N, seed = BATCH_2
    _one_update(group, algo, lambda: make_batch(algo.shard.inference or algo.policy, T, N, seed))
    if group.leader:
        save_file(_trained(algo), str(root / "fsdp_resume_world2.safetensors"))
        (root / "fsdp_resume_world2.json").write_text(json.dumps({"num_updates": algo.num_updates}))

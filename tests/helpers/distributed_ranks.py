"""Ranks of a torch.distributed (gloo, CPU) group for tests/learner/test_distributed_update.py, started with
``torch.multiprocessing.spawn(run_rank, ...)``. Each job does on every rank what ``pirl-learner`` does under
torchrun (learner/main.py): rank 0 holds the Trainer and its checkpoints, the others a replica that follows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from helpers.policy import rollout_batch

STATE = 6
SEED = 7  # the torch seed every run sets before its first update


def make_batch(policy, T: int, N: int, seed: int):
    """A seeded on-policy batch of ``T x N`` macro-steps sampled from ``policy``."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(T, N, STATE, generator=g)
    with torch.no_grad():
        noise = policy.draw_noise(T * N, generator=g)
        sample = policy.sample_chains({"observation.state": obs.reshape(T * N, STATE)}, *noise)
    rewards = torch.rand(T, N, generator=g)
    return rollout_batch({"observation.state": obs}, sample, rewards, groups=N)  # one GRPO group


def algorithm_config(**kw):
    from lerobot_policy_pi_rl.algorithm import PiRLAlgorithmConfig

    # large enough rates that the update visibly moves the weights
    return PiRLAlgorithmConfig(**{"actor_lr": 1e-3, "critic_lr": 1e-3, "update_epochs": 2, **kw})


# (algorithm settings, batch T, N): 15 samples in minibatches of 5 (slices 2 + 3: unequal), and minibatches of
# one sample (rank 1 holds none and joins at weight 0); GRPO (no critic)
UPDATE_CASES = [
    ({"num_minibatches": 3}, 3, 5),
    ({"num_minibatches": 6}, 2, 3),
    ({"advantage_estimator": "grpo", "grpo_filter_low": 0.0, "grpo_filter_high": 1.0, "num_minibatches": 2}, 3, 5),
]
BATCH_1, BATCH_2 = (3, 5, 11), (3, 5, 12)  # (T, N, seed) of the two updates of the checkpoint test


def trained(policy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in policy.rl_state_dict().items()}


def new_trainer(algo, pre, post, out: Path, group=None):
    from learner.service import Publisher
    from learner.store import PolicyShapes, RolloutStore
    from learner.trainer import Trainer, TrainerSettings

    store = RolloutStore(PolicyShapes.from_policy(algo.policy), max_version_lag=1, max_record_bytes=1 << 20)
    settings = TrainerSettings(eval_every=0, export_onnx=False)
    return Trainer(algo, store, Publisher(), out, settings, pre, post, group=group)


def run_rank(rank: int, world: int, port: int, root: str, job: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from learner.distributed import Group

    group = Group("cpu", timeout_s=300)
    try:
        {"update": _update, "save": _save, "resume": _resume}[job](group, Path(root))
    finally:
        group.close()


def _one_update(group, algo, batch_fn):
    """Rank 0 builds the batch, sends it (and its RNG state) and updates, then sends STOP; the others run
    learner/distributed.py's ``follow`` loop, as pirl-learner's ranks 1..N-1 do. Rank 0's stats."""
    from learner.distributed import STOP, follow

    if not group.leader:
        assert follow(algo, group) == 1
        return None
    stats = algo.update_on(group.update(batch_fn()))
    group.command(STOP)
    return stats


def _replica(group, pretrained: Path, **algo_kw):
    """What learner/main.py builds on every rank: the policy from ``pretrained``, the algorithm, split over ranks."""
    from learner.distributed import attach
    from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm
    from lerobot_policy_pi_rl.sft import load_policy

    policy, pre, post = load_policy(pretrained)
    algo = PiRLAlgorithm(policy, algorithm_config(**algo_kw))
    attach(algo, group)
    return algo, pre, post


def _update(group, root: Path) -> None:
    from learner.distributed import start_replicas

    for i, (kw, T, N) in enumerate(UPDATE_CASES):
        algo, _, _ = _replica(group, root / "sft", **kw)
        start_replicas(algo, group)
        torch.manual_seed(SEED)
        stats = _one_update(group, algo, lambda: make_batch(algo.policy, T, N, seed=i))  # noqa: B023
        group.check_same(algo.policy)  # every replica stepped alike
        if group.leader:
            save_file(trained(algo.policy), str(root / f"update_{i}.safetensors"))
            (root / f"update_{i}.json").write_text(json.dumps(stats.to_log_dict()))


def _save(group, root: Path) -> None:
    """One update at world size 2, then rank 0 checkpoints as the Trainer does after an update."""
    from learner.distributed import start_replicas

    algo, pre, post = _replica(group, root / "sft")
    start_replicas(algo, group)
    torch.manual_seed(SEED)
    T, N, seed = BATCH_1
    _one_update(group, algo, lambda: make_batch(algo.policy, T, N, seed))
    if group.leader:
        trainer = new_trainer(algo, pre, post, root / "learner", group)
        trainer.version = 1
        trainer.store.set_version(1)
        trainer.save()
    group.check_same(algo.policy)


def _resume(group, root: Path) -> None:
    """Resume the world-2 checkpoint at world size 2 (rank 0 picks it, rank 1 loads the one rank 0 names), then
    the second update."""
    from learner.checkpoints import CheckpointPicker
    from learner.distributed import start_replicas
    from lerobot_policy_pi_rl.algorithm import load_checkpoint

    ckpts = root / "learner" / "checkpoints"
    if group.leader:
        picker = CheckpointPicker(ckpts)
        algo, pre, post = picker.load(lambda c: _replica(group, c / "pretrained_model"))
        trainer = new_trainer(algo, pre, post, root / "learner", group)
        assert trainer.resume(picker)
        group.checkpoint(int(picker.current().name))
    else:
        name = group.checkpoint()
        algo, _, _ = _replica(group, ckpts / f"{name:06d}" / "pretrained_model")
        load_checkpoint(ckpts / f"{name:06d}", algo)
    start_replicas(algo, group)
    T, N, seed = BATCH_2
    _one_update(group, algo, lambda: make_batch(algo.policy, T, N, seed))
    group.check_same(algo.policy)
    if group.leader:
        save_file(trained(algo.policy), str(root / "resume_world2.safetensors"))
        (root / "resume_world2.json").write_text(json.dumps({"num_updates": algo.num_updates}))

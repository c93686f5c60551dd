"""The learner's update over torch.distributed (2 ranks, gloo, CPU) equals the one-process update on the same
batch, and a checkpoint written at world size 2 resumes at world size 1 and 2 (learner/distributed.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from helpers.distributed_ranks import (
    BATCH_1,
    BATCH_2,
    SEED,
    UPDATE_CASES,
    algorithm_config,
    make_batch,
    new_trainer,
    run_rank,
    trained,
)
from helpers.net import free_port
from helpers.policy import SMALL_SIZES, builtin_policy, save_checkpoint
from learner.distributed import DistributedConfig, RankSlice
from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm
from lerobot_policy_pi_rl.sft import load_policy

# float sums in another order (per-slice means summed over ranks) and AdamW's normalisation: close, not equal
TOL = {"atol": 2e-5, "rtol": 1e-4}


def spawn(job: str, root) -> None:
    mp.spawn(run_rank, args=(2, free_port(), str(root), job), nprocs=2, join=True)


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    save_checkpoint(root / "sft", *builtin_policy(0, **SMALL_SIZES))
    return root


def one_process(root, pretrained, **algo_kw):
    policy, pre, post = load_policy(pretrained)
    return PiRLAlgorithm(policy, algorithm_config(**algo_kw)), pre, post


def test_two_rank_update_equals_the_one_process_update(sft):
    spawn("update", sft)
    for i, (kw, T, N) in enumerate(UPDATE_CASES):
        algo, _, _ = one_process(sft, sft / "sft", **kw)
        before = trained(algo.policy)
        torch.manual_seed(SEED)
        stats = algo.update_on(make_batch(algo.policy, T, N, seed=i)).to_log_dict()
        ours = load_file(str(sft / f"update_{i}.safetensors"))
        after = trained(algo.policy)
        assert ours.keys() == after.keys()
        for k in after:
            torch.testing.assert_close(ours[k], after[k], **TOL, msg=lambda m, k=k, i=i: f"case {i}, {k}: {m}")
        # the update moved the weights (by far more than the tolerance): the comparison can fail
        assert max((after[k] - before[k]).abs().max().item() for k in after) > 1e-3, i
        theirs = json.loads((sft / f"update_{i}.json").read_text())
        for key in ("policy_loss", "approx_kl", "clip_fraction", "entropy", "actor_grad_norm", "optimizer_steps"):
            assert theirs[key] == pytest.approx(stats[key], rel=1e-4, abs=1e-6), (i, key)
        if "value_loss" in stats:
            assert theirs["value_loss"] == pytest.approx(stats["value_loss"], rel=1e-4, abs=1e-6)
            assert theirs["explained_variance"] == pytest.approx(stats["explained_variance"], rel=1e-6)


def test_checkpoint_written_at_world_two_resumes_at_world_one_and_two(sft):
    # uninterrupted, one process: both updates
    algo, _, _ = one_process(sft, sft / "sft")
    torch.manual_seed(SEED)
    algo.update_on(make_batch(algo.policy, *BATCH_1[:2], seed=BATCH_1[2]))
    after_first = trained(algo.policy)
    algo.update_on(make_batch(algo.policy, *BATCH_2[:2], seed=BATCH_2[2]))
    reference = trained(algo.policy)
    assert max((reference[k] - after_first[k]).abs().max().item() for k in reference) > 1e-3

    spawn("save", sft)  # the first update at world size 2, checkpointed by rank 0
    ckpt = sft / "learner" / "checkpoints" / "000001"
    assert (ckpt / "pretrained_model" / "model.safetensors").is_file()  # LeRobot's layout, consolidated
    assert (ckpt / "training_state").is_dir() and (ckpt / "manifest.json").is_file()

    # world size 1: the plain learner's resume of the world-2 checkpoint, then the second update
    from learner.checkpoints import CheckpointPicker

    picker = CheckpointPicker(sft / "learner" / "checkpoints")
    algo1, pre, post = picker.load(lambda c: one_process(sft, c / "pretrained_model"))
    trainer = new_trainer(algo1, pre, post, sft / "learner")
    assert trainer.resume(picker) and trainer.version == 1 and algo1.num_updates == 1
    algo1.update_on(make_batch(algo1.policy, *BATCH_2[:2], seed=BATCH_2[2]))
    resumed1 = trained(algo1.policy)

    spawn("resume", sft)  # world size 2: resume, the second update
    resumed2 = load_file(str(sft / "resume_world2.safetensors"))
    assert json.loads((sft / "resume_world2.json").read_text())["num_updates"] == 2
    for k in reference:
        torch.testing.assert_close(resumed1[k], reference[k], **TOL)
        torch.testing.assert_close(resumed2[k], reference[k], **TOL)


class _Group:
    def __init__(self, rank, world):
        self.rank, self.world = rank, world


@pytest.mark.parametrize("n", [1, 2, 5, 7, 16])
@pytest.mark.parametrize("world", [2, 3, 8])
def test_rank_slices_cover_the_minibatch_once_with_shares_summing_to_one(n, world):
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    parts = [RankSlice(_Group(r, world)).part(idx) for r in range(world)]
    rows = torch.cat([p for p, share in parts if share > 0])
    assert torch.equal(rows, idx)  # contiguous, in order, each row once
    assert sum(share for _, share in parts) == pytest.approx(1.0)
    assert all(len(p) == 1 for p, share in parts if share == 0)  # an empty rank still evaluates one row


def test_distributed_config_refuses_bad_values():
    with pytest.raises(ValueError, match="strategy"):
        DistributedConfig(strategy="zero3")
    with pytest.raises(ValueError, match="timeout_s"):
        DistributedConfig(timeout_s=0)


def test_bc_term_is_refused_under_torchrun_with_the_reason():
    from learner.distributed import check_supported

    check_supported(algorithm_config())  # no BC term: fine
    with pytest.raises(ValueError, match="bc_coef.*rank 0 only"):
        check_supported(algorithm_config(bc_coef=0.1))

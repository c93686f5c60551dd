"""``--distributed.strategy=fsdp2`` (2 ranks, gloo, CPU): the trained modules sharded by FSDP2, and the update
equals the one-process update on the same batch; a checkpoint written under fsdp2 at world size 2 is in
LeRobot's layout and resumes at world size 1 and 2 (learner/distributed.py: FSDP2Slice)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from helpers.distributed_ranks import BATCH_1, BATCH_2, SEED, UPDATE_CASES, algorithm_config, make_batch, trained
from helpers.fsdp2_ranks import run_rank
from helpers.net import free_port
from helpers.policy import SMALL_SIZES, builtin_policy, save_checkpoint
from learner.distributed import DistributedConfig, FSDP2Slice
from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm
from lerobot_policy_pi_rl.sft import load_policy

# float sums in another order (per-slice gradients reduce-scattered) and AdamW's normalisation: close, not equal
TOL = {"atol": 2e-5, "rtol": 1e-4}


def spawn(job: str, root) -> None:
    mp.spawn(run_rank, args=(2, free_port(), str(root), job), nprocs=2, join=True)


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    save_checkpoint(root / "sft", *builtin_policy(0, **SMALL_SIZES))
    return root


def one_process(pretrained, **algo_kw):
    policy, pre, post = load_policy(pretrained)
    return PiRLAlgorithm(policy, algorithm_config(**algo_kw)), pre, post


def test_fsdp2_update_equals_the_one_process_update(sft):
    spawn("update", sft)
    for i, (kw, T, N) in enumerate(UPDATE_CASES):
        algo, _, _ = one_process(sft / "sft", **kw)
        before = trained(algo.policy)
        torch.manual_seed(SEED)
        stats = algo.update_on(make_batch(algo.policy, T, N, seed=i)).to_log_dict()
        ours = load_file(str(sft / f"fsdp_update_{i}.safetensors"))
        after = trained(algo.policy)
        assert ours.keys() == after.keys()
        for k in after:
            torch.testing.assert_close(ours[k], after[k], **TOL, msg=lambda m, k=k, i=i: f"case {i}, {k}: {m}")
        # the update moved the weights (by far more than the tolerance): the comparison can fail
        assert max((after[k] - before[k]).abs().max().item() for k in after) > 1e-3, i
        theirs = json.loads((sft / f"fsdp_update_{i}.json").read_text())
        for key in ("policy_loss", "approx_kl", "clip_fraction", "entropy", "actor_grad_norm", "optimizer_steps"):
            assert theirs[key] == pytest.approx(stats[key], rel=1e-4, abs=1e-6), (i, key)
        if "value_loss" in stats:
            assert theirs["value_loss"] == pytest.approx(stats["value_loss"], rel=1e-4, abs=1e-6)
            assert theirs["critic_grad_norm"] == pytest.approx(stats["critic_grad_norm"], rel=1e-4, abs=1e-6)


def test_fsdp2_checkpoint_resumes_at_world_one_and_two(sft):
    from helpers.distributed_ranks import new_trainer
    from learner.checkpoints import CheckpointPicker

    algo, _, _ = one_process(sft / "sft")
    torch.manual_seed(SEED)
    algo.update_on(make_batch(algo.policy, *BATCH_1[:2], seed=BATCH_1[2]))
    after_first = trained(algo.policy)
    algo.update_on(make_batch(algo.policy, *BATCH_2[:2], seed=BATCH_2[2]))
    reference = trained(algo.policy)
    assert max((reference[k] - after_first[k]).abs().max().item() for k in reference) > 1e-3

    spawn("save", sft)  # the first update at world size 2 under fsdp2, checkpointed by rank 0
    ckpt = sft / "fsdp_learner" / "checkpoints" / "000001"
    assert (ckpt / "pretrained_model" / "model.safetensors").is_file()  # LeRobot's layout, consolidated
    assert (ckpt / "manifest.json").is_file()
    saved = load_file(str(ckpt / "pretrained_model" / "model.safetensors"))
    for k in after_first:  # the full tensors, gathered from the shards
        torch.testing.assert_close(saved[k], after_first[k], **TOL)
    # the optimizer states were written whole: every AdamW moment has its parameter's full shape, not a shard's
    for name, params in (("actor", algo.policy.rl_actor_parameters()), ("critic", algo.policy.rl_critic_parameters())):
        state = load_file(str(ckpt / "training_state" / name / "optimizer_state.safetensors"))
        for i, p in enumerate(params):
            assert state[f"state/{i}/exp_avg"].shape == state[f"state/{i}/exp_avg_sq"].shape == p.shape, (name, i)

    # world size 1: the plain learner resumes the fsdp2 checkpoint, then the second update
    picker = CheckpointPicker(sft / "fsdp_learner" / "checkpoints")
    algo1, pre, post = picker.load(lambda c: one_process(c / "pretrained_model"))
    trainer = new_trainer(algo1, pre, post, sft / "fsdp_learner")
    assert trainer.resume(picker) and trainer.version == 1 and algo1.num_updates == 1
    algo1.update_on(make_batch(algo1.policy, *BATCH_2[:2], seed=BATCH_2[2]))
    resumed1 = trained(algo1.policy)

    spawn("resume", sft)  # world size 2 under fsdp2: resume, the second update
    resumed2 = load_file(str(sft / "fsdp_resume_world2.safetensors"))
    assert json.loads((sft / "fsdp_resume_world2.json").read_text())["num_updates"] == 2
    for k in reference:
        torch.testing.assert_close(resumed1[k], reference[k], **TOL)
        torch.testing.assert_close(resumed2[k], reference[k], **TOL)


def test_fsdp2_is_accepted_and_shards_exactly_the_trained_modules():
    assert DistributedConfig(strategy="fsdp2").strategy == "fsdp2"
    policy, _, _ = builtin_policy(0, **SMALL_SIZES)
    mods = FSDP2Slice.trained_modules(policy)
    ids = {id(p) for m in mods for p in m.parameters()}
    assert ids == {id(p) for p in [*policy.rl_actor_parameters(), *policy.rl_critic_parameters()]}
    frozen = [p for p in policy.parameters() if id(p) not in ids]
    assert frozen  # the frozen set (here the prefix encoder) stays outside the sharded modules

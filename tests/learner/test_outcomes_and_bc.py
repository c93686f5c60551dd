"""People in the loop, learner side: teleoperator interventions and outcome labels on rollout records.

An intervened macro-step never reaches the PPO loss (its sampled chunk is not what ran) but its teleoperated
ticks become a BC sample; offline demonstrations (a local LeRobotDataset) join the same BC batches; an
episode an operator aborted is never trained on; a learner that requires outcomes refuses an episode's
last record without a label; with nothing intervened the PPO update is what it was.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from edge.records import Outcome, make_record
from helpers.policy import ACTION_DIM, STATE_DIM, rollout_batch, sampled_decision, small_policy
from learner import metrics
from learner.bc_data import BCData, BCSettings, OfflineDatasetConfig
from learner.configuration import LearnerConfig
from learner.service import Publisher
from learner.store import PolicyShapes, RecordError, RolloutStore, episodes_to_batch
from learner.trainer import Trainer, TrainerSettings
from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm, PiRLAlgorithmConfig
from lerobot_policy_pi_rl.rollout import RolloutBatch
from pirl.codec import to_tensor_msg
from pirl.v1 import pirl_pb2

ROBOT = "robot-0"
ACTION_STD = 2.0  # the policy's action statistics: normalised = robot units / 2
OBS = "observation.state"


@pytest.fixture(scope="module")
def policy_pre():
    policy, pre, _ = small_policy(0, action_std=ACTION_STD)
    return policy, pre


@pytest.fixture(scope="module")
def decisions(policy_pre):
    """Real sampled chunks with distinct observations (seed i -> observation i), as an edge records them."""
    return [sampled_decision(policy_pre[0], seed=100 + i) for i in range(8)]


def store_for(policy, **kw) -> RolloutStore:
    return RolloutStore(PolicyShapes.from_policy(policy), max_version_lag=1, max_record_bytes=1 << 20, **kw)


def rec(seq, episode, step, decision, *, last=False, label=None, intervention=None, env_steps=4, **outcome):
    o = Outcome(reward=1.0, terminated=last, env_steps=env_steps, label=label, intervention=intervention, **outcome)
    return pirl_pb2.RolloutRecord.FromString(make_record(ROBOT, seq, episode, step, decision, o))


def teleop(pattern: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(executed [n, action_dim], teleop [n]) for a pattern like 'TTF.' (T: the teleoperator drove the tick)."""
    executed = np.random.default_rng(seed).normal(size=(len(pattern), ACTION_DIM)).astype(np.float32)
    return executed, np.array([c == "T" for c in pattern])


def refused(store, record) -> RecordError:
    with pytest.raises(RecordError) as ei:
        store.add(ROBOT, record)
    return ei.value


# ------------------------------------------------------------------------------------------ intake validation


def test_intervention_and_label_are_decoded_and_kept_in_the_step(policy_pre, decisions):
    store = store_for(policy_pre[0])
    executed, tele = teleop("TTFF")
    label = ("OPERATOR", "SUCCESS", 0.0)
    store.add(ROBOT, rec(0, "ep", 0, decisions[0], intervention=(executed, tele)))
    store.add(ROBOT, rec(1, "ep", 1, decisions[1], last=True, label=label))
    (ep,) = store.take_episodes(1)
    first, last = ep.steps
    assert first.intervened and not last.intervened
    np.testing.assert_array_equal(first.executed, executed)
    np.testing.assert_array_equal(first.teleop, tele)
    assert (last.label_source, last.label_verdict) == (pirl_pb2.EpisodeLabel.OPERATOR, pirl_pb2.EpisodeLabel.SUCCESS)
    assert store.counts["intervened_steps"] == 1


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda r: r.intervention.executed.CopyFrom(to_tensor_msg(np.zeros((4, 2), np.float32))), "executed"),
        (lambda r: r.intervention.executed.CopyFrom(to_tensor_msg(np.zeros((3, 3), np.float32))), "executed"),
        (lambda r: r.intervention.executed.CopyFrom(to_tensor_msg(np.zeros((4, 3), np.float64))), "executed"),
        (lambda r: r.intervention.executed.CopyFrom(to_tensor_msg(np.full((4, 3), np.nan, np.float32))), "non-finite"),
        (lambda r: r.intervention.teleop.CopyFrom(to_tensor_msg(np.ones(4, np.uint8))), "teleop"),
        (lambda r: r.intervention.teleop.CopyFrom(to_tensor_msg(np.ones(5, bool))), "teleop"),
        (lambda r: r.intervention.ClearField("teleop"), "teleop"),
    ],
)
def test_malformed_interventions_are_refused_naming_the_field(policy_pre, decisions, mutate, needle):
    record = rec(0, "ep", 0, decisions[0], intervention=teleop("TTTT"))
    mutate(record)
    e = refused(store_for(policy_pre[0]), record)
    assert (e.code, e.reason, e.final) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid", True)
    assert needle in e.message, e.message


@pytest.mark.parametrize(
    "label, last, needle",
    [
        (pirl_pb2.EpisodeLabel(source=pirl_pb2.EpisodeLabel.OPERATOR, verdict=7), True, "label.verdict"),
        (pirl_pb2.EpisodeLabel(source=9, verdict=pirl_pb2.EpisodeLabel.SUCCESS), True, "label.source"),
        (pirl_pb2.EpisodeLabel(source=pirl_pb2.EpisodeLabel.OPERATOR), True, "label.verdict"),
        (pirl_pb2.EpisodeLabel(source="DETECTOR", verdict="SUCCESS", detector_score=1.5), True, "detector_score"),
        (pirl_pb2.EpisodeLabel(source="OPERATOR", verdict="SUCCESS"), False, "last record"),
    ],
)
def test_invalid_labels_are_refused(policy_pre, decisions, label, last, needle):
    record = rec(0, "ep", 0, decisions[0], last=last)
    record.label.CopyFrom(label)
    e = refused(store_for(policy_pre[0]), record)
    assert (e.code, e.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid")
    assert needle in e.message, e.message


# ------------------------------------------------------------------------------------------ outcomes


def test_require_outcome_refuses_an_unlabelled_last_record(policy_pre, decisions):
    store = store_for(policy_pre[0], require_outcome=True)
    assert store.add(ROBOT, rec(0, "ep", 0, decisions[0])) == pirl_pb2.RolloutAck.ACCEPTED  # not the last: fine
    for record in (rec(1, "ep", 1, decisions[1], last=True), rec(1, "ep", 1, decisions[1], truncated=True)):
        for k, v in record.observation.items() if record.truncated else ():
            record.final_observation[k].CopyFrom(v)
        e = refused(store, record)
        assert (e.code, e.reason, e.final) == (grpc.StatusCode.FAILED_PRECONDITION, "no_outcome", True)
        assert "without an outcome label" in e.message
        assert "outcome source (operator labels or a success detector" in e.message
        assert "--trainer.require_outcome" in e.message
    assert "no_outcome" in metrics.REJECT_REASONS  # exported at 0 with the other refusal reasons
    labelled = rec(1, "ep", 1, decisions[1], last=True, label=("TIME_LIMIT", "FAILURE", 0.0))
    assert store.add(ROBOT, labelled) == pirl_pb2.RolloutAck.ACCEPTED
    # off (the default): the env's own outcome is enough
    assert store_for(policy_pre[0]).add(ROBOT, rec(0, "e", 0, decisions[0], last=True)) == pirl_pb2.RolloutAck.ACCEPTED


def test_aborted_episodes_are_dropped_when_batches_are_taken(policy_pre, decisions):
    store = store_for(policy_pre[0])
    before = REGISTRY.get_sample_value("pirl_learner_aborted_episodes_total") or 0.0
    store.add(ROBOT, rec(0, "kept", 0, decisions[0], last=True, label=("OPERATOR", "FAILURE", 0.0)))
    store.add(ROBOT, rec(1, "aborted", 0, decisions[1], intervention=teleop("TTTT")))
    store.add(ROBOT, rec(2, "aborted", 1, decisions[2], last=True, label=("OPERATOR", "ABORT", 0.0)))
    assert store.pending_episodes() == 2
    # the update loop takes whole batches: the aborted one is dropped, the kept one waits for a second
    assert store.take_episodes(2, whole=True) == [] and store.pending_episodes() == 1
    assert store.counts["aborted_episodes"] == 1
    assert REGISTRY.get_sample_value("pirl_learner_aborted_episodes_total") == before + 1
    store.add(ROBOT, rec(3, "next", 0, decisions[3], last=True))
    assert [ep.episode_id for ep in store.take_episodes(2, whole=True)] == ["kept", "next"]
    assert store.pending_episodes() == 0 and store.counts["aborted_episodes"] == 1


# ------------------------------------------------------------------------------------------ PPO exclusion, BC


def key(row) -> tuple:
    """A row of an observation, comparable across float32 / float64 and tiny normalisation epsilons."""
    return tuple(np.round(np.asarray(row, dtype=np.float64), 5).tolist())


def rows_of(x) -> set[tuple]:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return {key(r) for r in x.reshape(x.shape[0], -1)}


def obs_row(decision) -> tuple:
    return key(decision.observation[OBS])


def test_intervened_step_is_out_of_the_ppo_batch_and_in_the_bc_batch(tmp_path, policy_pre, decisions, monkeypatch):
    """Through the learner's own update path (Trainer._update): the surrogate never sees an intervened
    macro-step; the one whose first tick was teleoperated is the BC batch's sample, with its teleoperated
    actions normalised by the policy's statistics and the ticks after the operator let go padded."""
    policy, pre = policy_pre
    store = store_for(policy)
    d = decisions
    bc_first, mid_chunk = teleop("TTFT", seed=1), teleop("FTTT", seed=2)
    records = [
        rec(0, "a", 0, d[0]),
        rec(1, "a", 1, d[1], intervention=bc_first),  # teleop from tick 0: BC sample (ticks 0-1), no PPO
        rec(2, "a", 2, d[2], last=True),
        rec(3, "b", 0, d[3], intervention=mid_chunk),  # the operator took over mid-chunk: neither
        rec(4, "b", 1, d[4]),
        rec(5, "b", 2, d[5], last=True),
    ]
    for r in records:
        store.add(ROBOT, r)

    cfg = PiRLAlgorithmConfig(update_epochs=1, num_minibatches=1, bc_coef=0.5)
    bc = BCData(policy, pre, BCSettings(batch_size=4, offline_fraction=0.5))
    algo = PiRLAlgorithm(policy, cfg, demo_iterator=iter(bc))
    seen = {"ppo": [], "bc": []}
    evaluate, fm_loss = policy.evaluate_chains, policy.flow_matching_loss

    def spy_evaluate(obs, *a, **kw):
        seen["ppo"].append(obs[OBS].clone())
        return evaluate(obs, *a, **kw)

    def spy_bc(batch):
        seen["bc"].append({k: v.clone() for k, v in batch.items()})
        return fm_loss(batch)

    monkeypatch.setattr(policy, "evaluate_chains", spy_evaluate)
    monkeypatch.setattr(policy, "flow_matching_loss", spy_bc)
    settings = TrainerSettings(episodes_per_update=2, eval_every=0, export_onnx=False)
    trainer = Trainer(algo, store, Publisher(), tmp_path, settings, pre, None, bc_data=bc)
    bc_before = REGISTRY.get_sample_value("pirl_learner_bc_samples_total", {"source": "intervention"}) or 0.0
    trainer._update(store.take_episodes(2))

    (ppo,) = seen["ppo"]
    assert rows_of(ppo) == {obs_row(d[i]) for i in (0, 2, 4, 5)}  # neither intervened step
    (batch,) = seen["bc"]
    assert rows_of(batch[OBS]) == {obs_row(d[1])}  # only the step teleoperated from tick 0
    want = torch.zeros(policy.config.chunk_size, ACTION_DIM)
    want[:2] = torch.from_numpy(bc_first[0][:2]) / ACTION_STD
    for actions, pad in zip(batch["action"], batch["action_is_pad"], strict=True):
        torch.testing.assert_close(actions, want, rtol=1e-4, atol=1e-5)
        assert pad.tolist() == [False, False] + [True] * (policy.config.chunk_size - 2)
    row = trainer.history[-1]
    assert row["samples"] == 4 and row["intervened"] == 2 and row["bc_samples"] == 4 and row["bc_loss"] > 0
    assert REGISTRY.get_sample_value("pirl_learner_bc_samples_total", {"source": "intervention"}) == bc_before + 4
    assert REGISTRY.get_sample_value("pirl_learner_bc_loss") == pytest.approx(row["bc_loss"])


def test_episodes_to_batch_marks_intervened_steps(policy_pre, decisions):
    policy = policy_pre[0]
    store = store_for(policy)
    store.add(ROBOT, rec(0, "a", 0, decisions[0], intervention=teleop("FFFT")))
    store.add(ROBOT, rec(1, "a", 1, decisions[1], last=True))
    store.add(ROBOT, rec(2, "b", 0, decisions[2], last=True, intervention=teleop("FFFF")))  # nobody drove: none
    batch = episodes_to_batch(store.take_episodes(2), policy)
    assert batch.intervened.tolist() == [[True, False], [False, False]]
    assert batch.trainable.tolist() == [[False, True], [True, False]]  # [T, N]: step 1 of b is padding


def make_batch(policy, T=4, N=6, seed=0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(T, N, STATE_DIM, generator=g)
    with torch.no_grad():
        noise = policy.draw_noise(T * N, generator=g)
        sample = policy.sample_chains({OBS: obs.reshape(T * N, STATE_DIM)}, *noise)
    rewards = torch.rand(T, N, generator=g)
    return rollout_batch({OBS: obs}, sample, rewards, success_threshold=2, groups=3)


def test_ppo_update_is_unchanged_when_nothing_is_intervened():
    """The default (no intervened field: in-process run_pirl) and an all-False mask give bit-identical
    updates, and the advantages are plain GAE normalised over the valid steps, as before interventions."""
    from lerobot_policy_pi_rl.advantages import compute_gae, normalize_advantages

    results = []
    for explicit in (False, True):
        policy = small_policy(0)[0]
        batch = make_batch(policy)
        if explicit:
            batch.intervened = torch.zeros_like(batch.valid)
        algo = PiRLAlgorithm(policy, PiRLAlgorithmConfig(update_epochs=2, num_minibatches=2))
        adv, _, mask = algo.compute_advantages(batch)
        gae, _ = compute_gae(
            batch.rewards,
            batch.values,
            batch.terminated,
            batch.truncated,
            batch.bootstrap_values,
            batch.valid,
            0.99,
            0.95,
        )
        torch.testing.assert_close(adv, normalize_advantages(gae, batch.valid), rtol=0, atol=0)
        assert torch.equal(mask, batch.valid)
        torch.manual_seed(1)
        stats = algo.update_on(batch)
        assert stats.extra["samples"] == batch.valid.sum() and stats.extra["intervened"] == 0
        results.append({k: v.clone() for k, v in policy.state_dict().items()})
    for k, v in results[0].items():
        torch.testing.assert_close(v, results[1][k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("estimator", ["ppo", "grpo"])
def test_intervened_steps_flow_through_gae_but_leave_every_loss(estimator):
    policy = small_policy(0)[0]
    batch = make_batch(policy)
    intervened = torch.zeros_like(batch.valid)
    intervened[1, 0] = intervened[2, 3] = True
    cfg = PiRLAlgorithmConfig(
        advantage_estimator=estimator, normalize_advantages=False, grpo_filter_low=0.0, grpo_filter_high=1.0
    )
    algo = PiRLAlgorithm(policy, cfg)
    plain_adv, plain_ret, _ = algo.compute_advantages(batch)
    batch.intervened = intervened
    adv, ret, mask = algo.compute_advantages(batch)
    assert torch.equal(mask, batch.valid & ~intervened)
    # the rewards of an intervened step still reach the steps before it: the advantages of the steps that
    # train are those of the batch without interventions (GAE, or GRPO's episode returns, run over all)
    torch.testing.assert_close(adv[mask], plain_adv[mask], rtol=0, atol=0)
    torch.testing.assert_close(ret[mask], plain_ret[mask], rtol=0, atol=0)
    stats = algo.update_on(batch)
    assert stats.extra["samples"] == batch.valid.sum() - 2 and stats.extra["intervened"] == 2


def test_a_minibatch_without_bc_data_skips_the_bc_term(policy_pre):
    policy = small_policy(0)[0]
    bc = BCData(policy, policy_pre[1], BCSettings())
    assert bc.next_batch() is None
    algo = PiRLAlgorithm(policy, PiRLAlgorithmConfig(bc_coef=0.5, update_epochs=1), demo_iterator=iter(bc))
    stats = algo.update_on(make_batch(policy))
    assert "bc_loss" not in stats.losses and stats.extra["bc_samples"] == 0.0
    assert stats.extra["optimizer_steps"] > 0


# ------------------------------------------------------------------------------------------ offline demonstrations


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory):
    from lerobot_policy_pi_rl.sft import REPO_ID, record_demos

    root = tmp_path_factory.mktemp("offline") / "demos"
    ds = record_demos(root, 2, seed=0)
    states = np.stack([ds[i][OBS].numpy() for i in range(len(ds))])
    return OfflineDatasetConfig(root=str(root), repo_id=REPO_ID), states


def test_offline_demonstrations_reach_the_bc_batch(policy_pre, decisions, demo_dataset):
    policy, pre = policy_pre
    offline, states = demo_dataset
    bc = BCData(policy, pre, BCSettings(batch_size=6, offline_fraction=0.5), offline, seed=0)
    batch = bc.next_batch()  # no intervention yet: the whole batch is offline frames
    H = policy.config.chunk_size
    assert set(batch) == {OBS, "action", "action_is_pad"}
    assert batch[OBS].shape == (6, STATE_DIM) and batch["action"].shape == (6, H, ACTION_DIM)
    assert batch["action_is_pad"].shape == (6, H) and batch["action_is_pad"].dtype == torch.bool
    # the pre-processor's normalisation (identity for the state in these stats) of frames of the dataset
    assert rows_of(batch[OBS]) <= rows_of(states)
    assert torch.isfinite(policy.flow_matching_loss(batch))

    # with interventions too: offline_fraction of the batch from the dataset, the rest from the buffer
    store = store_for(policy)
    store.add(ROBOT, rec(0, "ep", 0, decisions[6], last=True, intervention=teleop("TTTT")))
    assert bc.add_episodes(store.take_episodes(1)) == 1
    assert bc.split() == (3, 3)
    mixed = bc.next_batch()
    from_buffer = [key(r) == obs_row(decisions[6]) for r in mixed[OBS].cpu().numpy()]
    assert sum(from_buffer) == 3

    # and through an update: the BC term trains on them
    algo = PiRLAlgorithm(policy, PiRLAlgorithmConfig(bc_coef=0.5, update_epochs=1), demo_iterator=iter(bc))
    off_before = REGISTRY.get_sample_value("pirl_learner_bc_samples_total", {"source": "offline"})
    stats = algo.update_on(make_batch(policy))
    assert stats.losses["bc_loss"] > 0 and stats.extra["bc_samples"] == 6 * stats.extra["optimizer_steps"]
    assert REGISTRY.get_sample_value("pirl_learner_bc_samples_total", {"source": "offline"}) > off_before


def test_learner_flags_of_people_in_the_loop(demo_dataset, capsys):
    from pirl.cli import parse_config

    offline, _ = demo_dataset
    flags = [
        "--tokens=t.json",
        f"--offline_dataset.root={offline.root}",
        f"--offline_dataset.repo_id={offline.repo_id}",
    ]
    more = [
        "--algorithm.bc_coef=0.1",
        "--bc.batch_size=8",
        "--bc.offline_fraction=0.25",
        "--trainer.require_outcome=true",
    ]
    cfg = parse_config(LearnerConfig, prog="pirl-learner", args=flags + more)
    assert cfg.offline_dataset == offline and cfg.bc == BCSettings(batch_size=8, offline_fraction=0.25)
    assert cfg.trainer.require_outcome and cfg.algorithm.bc_coef == 0.1
    with pytest.raises(SystemExit) as ei:  # offline demonstrations without the BC term: one error line
        parse_config(LearnerConfig, prog="pirl-learner", args=flags)
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "offline_dataset.root" in err and "--algorithm.bc_coef > 0" in err, err


def test_offline_dataset_settings_are_checked(tmp_path, demo_dataset):
    offline, _ = demo_dataset
    with pytest.raises(ValueError, match="offline_dataset.root: .* is not a LeRobotDataset"):
        OfflineDatasetConfig(root=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="--algorithm.bc_coef > 0"):
        LearnerConfig(tokens="tokens.json", offline_dataset=offline)
    with pytest.raises(ValueError, match="bc.offline_fraction"):
        BCSettings(offline_fraction=1.5)
    with pytest.raises(ValueError, match="bc.batch_size"):
        BCSettings(batch_size=0)


def test_with_bc_successes_the_policys_own_successful_chunks_join_the_bc_buffer(policy_pre, decisions):
    """Self-imitation: every macro-step of a successful episode that a person did not drive becomes a BC sample of
    the chunk the policy sampled (its chain's x_0) over the ticks it ran; failed episodes add nothing."""
    policy, pre = policy_pre
    d = decisions
    store = store_for(policy)
    for r in [
        rec(0, "won", 0, d[0], env_steps=3),
        rec(1, "won", 1, d[1], intervention=teleop("FTTT", seed=3)),  # a person drove part of it: neither
        rec(2, "won", 2, d[2], last=True, success=True),
        rec(3, "lost", 0, d[3]),
        rec(4, "lost", 1, d[4], last=True),
    ]:
        store.add(ROBOT, r)
    episodes = store.take_episodes(2)
    assert BCData(policy, pre, BCSettings()).add_episodes(episodes) == 0  # off by default
    bc = BCData(policy, pre, BCSettings(batch_size=8, successes=True))
    assert bc.add_episodes(episodes) == 2
    assert {p[3] for p in bc.buffer} == {"success"}
    by_obs = {obs_row(d[i]): d[i] for i in (0, 2)}
    for obs, actions, pad, _ in bc.buffer:
        decision = by_obs[key(obs[OBS])]
        n = 3 if decision is d[0] else 4
        want = torch.zeros(policy.config.chunk_size, ACTION_DIM)
        want[:n] = torch.from_numpy(decision.chain[-1, :n, :ACTION_DIM])
        torch.testing.assert_close(actions, want)
        assert pad.tolist() == [False] * n + [True] * (policy.config.chunk_size - n)
    before = REGISTRY.get_sample_value("pirl_learner_bc_samples_total", {"source": "success"}) or 0.0
    assert rows_of(bc.next_batch()[OBS]) <= set(by_obs)
    assert REGISTRY.get_sample_value("pirl_learner_bc_samples_total", {"source": "success"}) == before + 8


def test_the_bc_buffer_is_checkpointed_and_restored_at_resume(tmp_path, decisions):
    """A person's corrections survive a learner restart: the BC buffer goes into the checkpoint (hashed with the
    rest) and a resumed trainer's buffer holds the same samples; a buffer that does not fit the policy is
    refused with a message."""
    from safetensors.torch import save_file

    from learner.bc_data import BUFFER_FILE

    def trainer(seed_policy: int):
        policy, pre, _ = small_policy(seed_policy, action_std=ACTION_STD)
        bc = BCData(policy, pre, BCSettings(batch_size=4))
        cfg = PiRLAlgorithmConfig(update_epochs=1, num_minibatches=1, bc_coef=0.5)
        algo = PiRLAlgorithm(policy, cfg, demo_iterator=iter(bc))
        settings = TrainerSettings(episodes_per_update=2, eval_every=0, export_onnx=False)
        return Trainer(algo, store_for(policy), Publisher(), tmp_path, settings, pre, None, bc_data=bc), bc

    t1, bc1 = trainer(0)
    d = decisions
    for r in [
        rec(0, "a", 0, d[0], intervention=teleop("TTTT", seed=5)),
        rec(1, "a", 1, d[1], intervention=teleop("TFFF", seed=6), last=True),
        rec(2, "b", 0, d[2]),
        rec(3, "b", 1, d[3], last=True),
    ]:
        t1.store.add(ROBOT, r)
    t1._update(t1.store.take_episodes(2))
    assert len(bc1.buffer) == 2
    t1.save()
    saved = t1.checkpoints_dir / f"{t1.version:06d}"
    assert BUFFER_FILE in (saved / "manifest.json").read_text()  # hashed: a changed buffer refuses the checkpoint

    t2, bc2 = trainer(1)
    assert not bc2.buffer and t2.resume() and t2.version == t1.version
    assert len(bc2.buffer) == 2 and REGISTRY.get_sample_value("pirl_learner_bc_intervention_samples") == 2
    for (o1, a1, p1, s1), (o2, a2, p2, s2) in zip(bc1.buffer, bc2.buffer, strict=True):
        torch.testing.assert_close(o2[OBS], o1[OBS], rtol=0, atol=0)
        torch.testing.assert_close(a2, a1, rtol=0, atol=0)
        assert p2.tolist() == p1.tolist() and s1 == s2 == "intervention"

    wrong = tmp_path / "wrong.safetensors"
    (obs, actions, pad, _) = bc1.buffer[0]
    save_file({f"obs.{OBS}": obs[OBS][None], "action": actions[None, :, :1].contiguous(), "action_is_pad": pad[None],
               "source": torch.zeros(1, dtype=torch.uint8)}, str(wrong))  # fmt: skip
    with pytest.raises(ValueError, match=r"its action is \(1, \d+, 1\)"):
        bc2.read(wrong)


def test_under_noise_steering_the_bc_buffer_holds_the_initial_noises_of_successes(tmp_path):
    """noise_steer: the flow policy is frozen, so the BC term imitates initial noises. A successful episode's
    macro-steps add the x_1 their chunks were sampled from (every chunk position); a teleoperated chunk has none
    and is left out; the batch carries them as `initial_noise`; the checkpointed buffer says what it holds."""
    from learner.bc_data import BUFFER_FILE

    policy, pre, _ = small_policy(0, action_std=ACTION_STD, noise_method="noise_steer")
    d = [sampled_decision(policy, seed=200 + i) for i in range(4)]
    store = store_for(policy)
    for r in [
        rec(0, "won", 0, d[0], env_steps=3),
        rec(1, "won", 1, d[1], intervention=teleop("TTTT", seed=3)),  # a person drove it: no x_1 to imitate
        rec(2, "won", 2, d[2], last=True, success=True),
        rec(3, "lost", 0, d[3], last=True),
    ]:
        store.add(ROBOT, r)
    bc = BCData(policy, pre, BCSettings(batch_size=6, successes=True))
    assert bc.add_episodes(store.take_episodes(2)) == 2
    by_obs = {obs_row(d[i]): d[i] for i in (0, 2)}
    for obs, x_1, pad, source in bc.buffer:
        want = torch.from_numpy(by_obs[key(obs[OBS])].chain[0, :, :ACTION_DIM])
        torch.testing.assert_close(x_1, want, rtol=0, atol=0)
        assert not pad.any() and source == "success"
    batch = bc.next_batch()
    assert set(batch) == {OBS, "initial_noise"} and batch["initial_noise"].shape == (
        6,
        policy.config.chunk_size,
        ACTION_DIM,
    )
    assert torch.isfinite(policy.steer_imitation_loss(batch))

    bc.save(tmp_path / BUFFER_FILE)
    assert len(bc.read(tmp_path / BUFFER_FILE)) == 2
    plain, plain_pre, _ = small_policy(0, action_std=ACTION_STD)
    with pytest.raises(ValueError, match="holds initial_noise targets"):
        BCData(plain, plain_pre, BCSettings(successes=True)).read(tmp_path / BUFFER_FILE)


def test_noise_steering_bc_needs_successes_and_refuses_offline_demos(demo_dataset):
    policy, pre, _ = small_policy(0, action_std=ACTION_STD, noise_method="noise_steer")
    with pytest.raises(ValueError, match="bc.successes=true"):
        BCData(policy, pre, BCSettings())
    with pytest.raises(ValueError, match="offline demonstrations have none"):
        BCData(policy, pre, BCSettings(successes=True), demo_dataset[0])


def test_off_policy_steering_replays_the_steered_steps_and_checkpoints_its_critic(tmp_path):
    """steer_update=q through the learner: a batch's steered macro-steps join the replay buffer with the x_1
    their chunks were sampled from and their return-to-go; a chunk a person drove does not; the version
    advances; the noise critic goes into the checkpoint and a resumed trainer has the same critic."""
    cfg = PiRLAlgorithmConfig(steer_update="q", q_steps=3, q_batch_size=4, q_warmup=0, q_hidden_dims=[8])

    def trainer(seed_policy: int):
        policy, pre, _ = small_policy(seed_policy, action_std=ACTION_STD, noise_method="noise_steer")
        settings = TrainerSettings(episodes_per_update=2, eval_every=0, export_onnx=False)
        return Trainer(PiRLAlgorithm(policy, cfg), store_for(policy), Publisher(), tmp_path, settings, pre, None)

    t1 = trainer(0)
    d = [sampled_decision(t1.algo.policy, seed=300 + i) for i in range(4)]
    for r in [
        rec(0, "won", 0, d[0]),
        rec(1, "won", 1, d[1], intervention=teleop("TTTT", seed=3)),  # a person drove it: the head did not choose
        rec(2, "won", 2, d[2], last=True, success=True),
        rec(3, "lost", 0, d[3], last=True),
    ]:
        t1.store.add(ROBOT, r)
    t1._update(t1.store.take_episodes(2))
    assert t1.version == 1
    replay = t1.algo.noise_replay
    assert len(replay) == 3
    steered = {tuple(np.round(d[i].chain[0, :, :ACTION_DIM].reshape(-1), 5)) for i in (0, 2, 3)}
    assert {tuple(np.round(row.numpy(), 5)) for row in replay.decisions} == steered
    # rewards are 1 per macro-step (rec): "won" ran 3 steps, "lost" 1, discounted by gamma
    g = cfg.gamma
    assert sorted(replay.returns.tolist()) == pytest.approx(sorted([1 + g + g * g, 1.0, 1.0]))
    # the update's diagnostics reach Prometheus (the learner dashboard's "Off-policy steering" panel)
    row = t1.history[-1]
    assert REGISTRY.get_sample_value("pirl_learner_steer_replay_macro_steps") == 3
    for gauge, key in [("q_loss", "q_loss"), ("head_q", "head_q"), ("std", "steer_std")]:
        assert REGISTRY.get_sample_value(f"pirl_learner_steer_{gauge}") == pytest.approx(row[key])

    t1.save()
    t2 = trainer(1)
    assert t2.resume() and t2.version == 1
    for k, v in t1.algo.noise_critic.state_dict().items():
        torch.testing.assert_close(t2.algo.noise_critic.state_dict()[k], v, rtol=0, atol=0)
    assert len(t2.algo.noise_replay) == 0  # learner memory only: refilled from new episodes


@pytest.mark.parametrize("from_takeovers", [True, False])
def test_a_chunk_critic_learns_from_a_persons_takeover(tmp_path, from_takeovers):
    """q_critic_input=action: a macro-step a person drove joins the replay with the actions that ran (normalised
    as the policy's chunks are: robot units / ACTION_STD) and its return-to-go, beside the steered steps'
    executed chunks; with q_interventions off it is left out, as under the noise critic."""
    cfg = PiRLAlgorithmConfig(
        steer_update="q",
        q_critic_input="action",
        q_interventions=from_takeovers,
        q_steps=2,
        q_batch_size=4,
        q_warmup=0,
        q_hidden_dims=[8],
    )
    policy, pre, _ = small_policy(0, action_std=ACTION_STD, noise_method="noise_steer")
    settings = TrainerSettings(episodes_per_update=1, eval_every=0, export_onnx=False)
    t = Trainer(PiRLAlgorithm(policy, cfg), store_for(policy), Publisher(), tmp_path, settings, pre, None)
    d = [sampled_decision(policy, seed=400 + i) for i in range(3)]
    executed, flags = teleop("FTTT", seed=5)  # the policy ran one tick, then the person drove
    for r in [
        rec(0, "ep", 0, d[0]),
        rec(1, "ep", 1, d[1], intervention=(executed, flags)),
        rec(2, "ep", 2, d[2], last=True, success=True),
    ]:
        t.store.add(ROBOT, r)
    t._update(t.store.take_episodes(1))
    replay, mask = t.algo.noise_replay, policy.action_mask.bool()
    chunks = {tuple(np.round(d[i].chain[-1][mask.numpy()], 5)) for i in (0, 2)}
    g = cfg.gamma
    if from_takeovers:
        ran = np.zeros(mask.shape, dtype=np.float32)
        ran[:4, :ACTION_DIM] = executed / ACTION_STD
        chunks.add(tuple(np.round(ran[mask.numpy()], 5)))
        returns = [1 + g + g * g, 1 + g, 1.0]
    else:
        returns = [1 + g + g * g, 1.0]
    assert {tuple(np.round(row.numpy(), 5)) for row in replay.decisions} == chunks
    assert sorted(replay.returns.tolist()) == pytest.approx(sorted(returns))
    assert t.history[-1]["replay_takeovers"] == (1.0 if from_takeovers else 0.0)
    assert t.history[-1]["intervened"] == 1.0


def test_demonstrations_start_the_chunk_critics_replay(demo_dataset):
    """--offline_dataset under a chunk critic: every demo episode cut into the edge's macro-steps (a decision every
    n_action_steps frames), each with its demonstrated chunk (normalised: robot units / ACTION_STD, zero past the
    episode's end) and the discounted return of a success at the episode's end; they join the replay. The noise
    critic refuses them (a demonstrated chunk has no x_1)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from learner.critic_demos import demonstrated_macro_steps
    from lerobot_policy_pi_rl.sft import REPO_ID

    offline, _ = demo_dataset
    policy, pre, _ = small_policy(0, action_std=ACTION_STD, noise_method="noise_steer")
    cfg = PiRLAlgorithmConfig(steer_update="q", q_critic_input="action", q_hidden_dims=[8])
    obs, actions, pad, returns = demonstrated_macro_steps(offline, policy, pre, cfg.gamma)

    ds = LeRobotDataset(REPO_ID, root=offline.root)
    episode = np.asarray(ds.hf_dataset.with_format("numpy")["episode_index"]).reshape(-1)
    raw = np.asarray(ds.hf_dataset.with_format("numpy")["action"], dtype=np.float32)
    n, H = policy.config.n_action_steps, policy.config.chunk_size
    expected_returns, firsts = [], []
    for e in np.unique(episode):
        frames = np.flatnonzero(episode == e)
        k = -(-len(frames) // n)  # macro-steps: ceil(frames / n_action_steps)
        expected_returns += [cfg.gamma ** (k - 1 - i) for i in range(k)]
        firsts += [(frames[i * n], frames[-1]) for i in range(k)]
    assert returns.tolist() == pytest.approx(expected_returns)
    assert obs[OBS].shape == (len(firsts), STATE_DIM) and actions.shape == (len(firsts), H, ACTION_DIM)
    for row, (start, last) in enumerate(firsts):  # the chunk from the decision's frame, normalised, padded at the end
        ran = min(H, last - start + 1)
        torch.testing.assert_close(actions[row, :ran], torch.from_numpy(raw[start : start + ran] / ACTION_STD))
        assert not pad[row, :ran].any() and pad[row, ran:].all()

    algo = PiRLAlgorithm(policy, cfg)
    assert algo.replay_demonstrations(obs, actions, pad, returns) == len(firsts) == len(algo.noise_replay)
    mask = policy.action_mask.bool()
    chunks = torch.zeros(len(firsts), *mask.shape)
    chunks[:, :H, :ACTION_DIM] = actions * ~pad[..., None]
    torch.testing.assert_close(algo.noise_replay.decisions, chunks[:, mask])
    torch.testing.assert_close(algo.noise_replay.returns, returns)
    # under q_target=td a demonstrated macro-step is a Monte Carlo row: its reward is its return, no next step
    td = PiRLAlgorithm(policy, PiRLAlgorithmConfig(**{**vars(cfg), "q_target": "td"}))
    td.replay_demonstrations(obs, actions, pad, returns)
    torch.testing.assert_close(td.noise_replay.rewards, returns)
    assert not td.noise_replay.discounts.any()

    noise_critic = PiRLAlgorithm(policy, PiRLAlgorithmConfig(steer_update="q", q_hidden_dims=[8]))
    with pytest.raises(ValueError, match="q_critic_input=action"):
        noise_critic.replay_demonstrations(obs, actions, pad, returns)

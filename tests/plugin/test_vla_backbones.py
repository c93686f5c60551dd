"""LeRobot's pi0, pi0.5 and SmolVLA as pi_rl backbones, on reduced-size instances of their real
modeling code (``backbone_reduced``; built offline with a stand-in tokenizer).

For each backbone and noise method: sampling, the learner's ratio of 1 before any update, one PPO
update that changes exactly the parameters that should train, save / load, and the ONNX export
against PyTorch on ONNX Runtime.
"""

import numpy as np
import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.factory import make_pre_post_processors
from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm, PiRLAlgorithmConfig
from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig, PiRLConfigError
from lerobot_policy_pi_rl.envs.reach_grasp import ReachGraspVecEnv
from lerobot_policy_pi_rl.input_stats import normalizer_stats
from lerobot_policy_pi_rl.modeling_pi_rl import PiRLPolicy
from lerobot_policy_pi_rl.rollout import PolicyRunner, collect_rollouts

BACKBONES = ("pi0", "pi05", "smolvla")
METHODS = ("flow_sde", "flow_noise")
IMAGE, STATE, ACTION_DIM, LANG = 32, 6, 3, 16
FEATURES = {
    "input_features": {
        "observation.image": PolicyFeature(FeatureType.VISUAL, (3, IMAGE, IMAGE)),
        "observation.state": PolicyFeature(FeatureType.STATE, (STATE,)),
    },
    "output_features": {"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
}
STATS = {
    "observation.state": {"mean": torch.zeros(STATE), "std": torch.ones(STATE)},
    "action": {"mean": torch.zeros(ACTION_DIM), "std": torch.ones(ACTION_DIM)},
}


def vla_config(backbone: str, **kw) -> PiRLConfig:
    kw.setdefault("noise_method", "flow_sde")
    kw.setdefault("backbone_config", {"tokenizer_max_length": LANG})
    kw.setdefault("backbone_reduced", {})
    return PiRLConfig(
        device="cpu", backbone=backbone, chunk_size=8, n_action_steps=4, max_action_dim=4, **FEATURES, **kw
    )


def vla_policy(backbone: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = vla_config(backbone, **kw)
    policy = PiRLPolicy(cfg).eval()
    pre, post = make_pre_post_processors(cfg, dataset_stats=STATS)
    return policy, pre, post


def observations(policy, pre, n=4, seed=0):
    """Normalised, tokenized observations of the built-in task in image mode."""
    env = ReachGraspVecEnv(n, autoreset=False, obs_type="pixels_agent_pos", image_size=IMAGE)
    raw, _ = env.reset(seed=seed)
    return PolicyRunner(policy, pre, None, task=env.task_description).observe(raw)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", METHODS)
def test_sampling_ratio_and_onnx_export(backbone, method, tmp_path):
    from pirl.export.onnx_export import OnnxSampler, export_onnx

    policy, pre, _ = vla_policy(backbone, noise_method=method)
    obs = observations(policy, pre)
    assert obs[OBS_LANGUAGE_TOKENS].shape == (4, LANG) and obs[OBS_LANGUAGE_TOKENS].dtype == torch.int64
    assert obs[OBS_LANGUAGE_ATTENTION_MASK].dtype == torch.bool
    noise = policy.draw_noise(4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        s = policy.sample_chains(obs, *noise)
        assert s.actions.shape == (4, 8, 4) and torch.isfinite(s.chain.chain).all()
        # the learner re-evaluates the stored chain from the same observation: ratio 1 before any update
        ev = policy.evaluate_chains(obs, s.chain.chain, s.chain.stochastic, s.noise_level)
    ratio = (ev.log_prob - s.chain.log_prob).exp()
    torch.testing.assert_close(ratio, torch.ones(4), rtol=0, atol=1e-4)
    torch.testing.assert_close(ev.value, s.value, rtol=0, atol=1e-5)

    # the exported graph (prefix + K steps, all noise as inputs) computes the same on ONNX Runtime,
    # FP32 tolerance 1e-5 relative-ish (absolute on normalised actions and on log-probs ~ 10)
    export_onnx(policy, tmp_path / "onnx")
    sampler = OnnxSampler(tmp_path / "onnx")
    out = sampler.run(
        {k: v.numpy() for k, v in obs.items()},
        noise[0].numpy(),
        noise[1].numpy(),
        noise[2].numpy(),
        s.noise_level.numpy(),
    )
    np.testing.assert_allclose(out["actions"], s.actions.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["log_prob"], s.chain.log_prob.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out["value"], s.value.numpy(), rtol=1e-5, atol=1e-5)
    # and a chain sampled through ONNX Runtime is valid PPO data for the learner in PyTorch
    with torch.no_grad():
        ev = policy.evaluate_chains(obs, torch.from_numpy(out["chain"]), noise[2], s.noise_level)
    torch.testing.assert_close(
        (ev.log_prob - torch.from_numpy(out["log_prob"])).exp(), torch.ones(4), rtol=0, atol=1e-4
    )


def _trainable_names(policy) -> set[str]:
    ids = {id(p) for p in policy.rl_actor_parameters() + policy.rl_critic_parameters()}
    return {n for n, p in policy.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", METHODS)
def test_one_ppo_update_changes_only_what_trains(backbone, method):
    policy, pre, post = vla_policy(backbone, noise_method=method)
    env = ReachGraspVecEnv(8, autoreset=False, obs_type="pixels_agent_pos", image_size=IMAGE, max_steps=16)
    batch = collect_rollouts(PolicyRunner(policy, pre, post), env, seeds=0, generator=torch.Generator().manual_seed(0))
    # an untrained policy never succeeds at the sparse task: give the batch some reward signal, so
    # the advantages and value targets are not all zero and every trainable tensor gets a gradient
    batch.rewards = torch.randn(batch.rewards.shape, generator=torch.Generator().manual_seed(1)) * batch.valid
    algo = PiRLAlgorithm(
        policy, PiRLAlgorithmConfig(actor_lr=1e-3, critic_lr=1e-3, update_epochs=1, num_minibatches=2, weight_decay=0.0)
    )
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    stats = algo.update_on(batch)
    assert not stats.extra.get("skipped"), stats.extra
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    trainable = _trainable_names(policy)
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    # the VLM prefix stays frozen; the action expert, the critic and (Flow-Noise) the noise head train
    assert not any(
        n.startswith("backbone.") and p in set(policy.backbone.prefix_parameters())
        for n, p in policy.named_parameters()
        if n in changed
    )
    expert = {n for n, p in policy.named_parameters() if any(p is q for q in policy.backbone.expert_parameters())}
    assert changed & expert, "the action expert did not train"
    assert any(n.startswith("value_head.") for n in changed)
    assert any(n.startswith("noise_head.") for n in changed) == (method == "flow_noise")
    assert changed == trainable, f"trainable tensors that did not move: {sorted(trainable - changed)}"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_save_load_round_trip_offline(backbone, tmp_path):
    """A saved pi_rl VLA reloads from its own directory with the same outputs, building the base
    model from the saved backbone_config (no base checkpoint, no hub)."""
    from lerobot_policy_pi_rl.sft import load_policy

    policy, pre, post = vla_policy(backbone, noise_method="flow_noise")
    with torch.no_grad():  # make the heads non-trivial so a lost tensor would show
        for p in list(policy.value_head.parameters()) + list(policy.noise_head.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    policy.save_pretrained(tmp_path)
    pre.save_pretrained(tmp_path)
    post.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    assert '"backbone_config"' in saved and '"tokenizer_max_length": 16' in saved

    loaded, pre2, _ = load_policy(tmp_path)
    obs = observations(policy, pre)
    obs2 = observations(loaded, pre2)
    for k in obs:
        torch.testing.assert_close(obs2[k], obs[k])
    noise = policy.draw_noise(4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = policy.sample_chains(obs, *noise), loaded.sample_chains(obs, *noise)
    torch.testing.assert_close(b.actions, a.actions, rtol=0, atol=0)
    torch.testing.assert_close(b.chain.log_prob, a.chain.log_prob, rtol=0, atol=0)
    torch.testing.assert_close(b.value, a.value, rtol=0, atol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_train_mode_is_deterministic_and_reused_prefix_is_exact(backbone):
    """Dropout is off (ratio 1 needs it); a precomputed frozen prefix gives the same evaluation."""
    policy, pre, _ = vla_policy(backbone, noise_method="flow_noise")
    obs = observations(policy, pre)
    noise = policy.draw_noise(4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        s = policy.sample_chains(obs, *noise)
    policy.train()
    ev1 = policy.evaluate_chains(obs, s.chain.chain, s.chain.stochastic, s.noise_level)
    ev2 = policy.evaluate_chains(obs, s.chain.chain, s.chain.stochastic, s.noise_level)
    torch.testing.assert_close(ev1.log_prob, ev2.log_prob, rtol=0, atol=0)
    rows = torch.tensor([2, 0])
    prefix = policy.rl_prefix(obs)
    sub = {k: v[rows] for k, v in obs.items()}
    ev3 = policy.evaluate_chains(
        sub, s.chain.chain[rows], s.chain.stochastic[rows], s.noise_level[rows], prefix=prefix.select(rows)
    )
    torch.testing.assert_close(ev3.log_prob, ev1.log_prob[rows], rtol=1e-5, atol=1e-5)
    policy.eval()


def test_pi05_state_enters_the_prompt_and_smolvla_pads_to_a_fixed_length():
    policy, pre, _ = vla_policy("pi05")
    a = observations(policy, pre, seed=0)[OBS_LANGUAGE_TOKENS]
    b = observations(policy, pre, seed=1)[OBS_LANGUAGE_TOKENS]
    assert not torch.equal(a, b), "pi0.5 discretises the state into the prompt: other states, other tokens"
    policy, pre, _ = vla_policy("smolvla")
    obs = observations(policy, pre)
    assert obs[OBS_LANGUAGE_TOKENS].shape == (4, LANG)  # max_length padding, not SmolVLA's "longest"


def test_critic_placement_defaults_follow_the_paper():
    assert vla_config("pi0").critic_placement == "expert"
    assert vla_config("pi05").critic_placement == "prefix"
    assert vla_config("smolvla").critic_placement == "expert"
    assert PiRLConfig(device="cpu").critic_placement == "prefix"


def test_a_vla_without_task_or_image_is_a_clear_error():
    policy, pre, post = vla_policy("pi0")
    env = ReachGraspVecEnv(2, autoreset=False, obs_type="pixels_agent_pos", image_size=IMAGE)
    raw, _ = env.reset(seed=0)
    with pytest.raises(ValueError, match="language instruction"):
        PolicyRunner(policy, pre, post).observe(raw)
    with pytest.raises(PiRLConfigError, match="at least one image"):
        PiRLPolicy(
            PiRLConfig(
                device="cpu",
                backbone="pi0",
                backbone_reduced={},
                input_features={"observation.state": PolicyFeature(FeatureType.STATE, (STATE,))},
                output_features=FEATURES["output_features"],
            )
        )


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"backbone_config": {"chunk_size": 4}}, r"backbone_config.*set by the pi_rl config"),
        ({"backbone_config": {"no_such_field": 1}}, r"policy.backbone_config: not a valid PI0Config"),
        ({"backbone_reduced": {"vlm_width": 0}}, r"backbone_reduced.vlm_width: must be >= 1"),
        ({"backbone_reduced": {"depth": 2}}, r"backbone_reduced: unknown field"),
    ],
)
def test_bad_backbone_settings_name_the_field(kw, match):
    cfg = dict(device="cpu", backbone="pi0", backbone_reduced={}, **FEATURES)
    cfg.update(kw)
    with pytest.raises((PiRLConfigError, ValueError), match=match):
        PiRLPolicy(PiRLConfig(**cfg))


def test_mlp_rejects_vla_only_fields():
    with pytest.raises(PiRLConfigError, match="policy.backbone"):
        PiRLConfig(device="cpu", backbone_reduced={}, **FEATURES)


def test_base_model_path_loads_through_lerobots_own_from_pretrained(tmp_path):
    """A SmolVLA checkpoint saved by LeRobot (same reduced size) starts the pi_rl policy through
    ``SmolVLAPolicy.from_pretrained``: the base weights arrive, the heads are new."""
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    donor, _, _ = vla_policy("smolvla", seed=7)
    base: SmolVLAPolicy = donor.backbone.base
    base.save_pretrained(tmp_path / "smolvla_base")
    cfg = vla_config("smolvla", base_model_path=str(tmp_path / "smolvla_base"))
    torch.manual_seed(0)
    policy = PiRLPolicy(cfg)
    for (n, a), (_, b) in zip(base.state_dict().items(), policy.backbone.base.state_dict().items(), strict=True):
        assert torch.equal(a, b), n

    wrong = vla_config("pi0", base_model_path=str(tmp_path / "smolvla_base"), backbone_reduced=None)
    with pytest.raises(PiRLConfigError, match="holds a 'smolvla' policy"):
        PiRLPolicy(wrong)


def test_learner_validates_token_ids(tmp_path):
    from learner.store import PolicyShapes, RecordError, decode_record
    from pirl.codec import to_tensor_msg
    from pirl.v1 import pirl_pb2

    policy, pre, _ = vla_policy("pi0")
    shapes = PolicyShapes.from_policy(policy)
    assert shapes.observation[OBS_LANGUAGE_TOKENS] == ("int64", (LANG,))
    assert shapes.token_limit == policy.backbone.vocab_size
    obs = observations(policy, pre, n=1)
    k1, h, d = shapes.chain

    def record(tokens):
        rec = pirl_pb2.RolloutRecord(
            robot_id="r",
            episode_id="e",
            sequence=0,
            chain=to_tensor_msg(np.zeros((k1, h, d), np.float32)),
            stochastic=to_tensor_msg(np.ones(k1 - 1, bool)),
        )
        for k, v in obs.items():
            rec.observation[k].CopyFrom(to_tensor_msg(v[0].numpy()))
        rec.observation[OBS_LANGUAGE_TOKENS].CopyFrom(to_tensor_msg(tokens))
        return rec

    good = obs[OBS_LANGUAGE_TOKENS][0].numpy()
    step = decode_record(record(good), shapes, 1 << 20)
    assert step.observation[OBS_LANGUAGE_TOKENS].dtype == np.int64
    bad = good.copy()
    bad[0] = policy.backbone.vocab_size
    with pytest.raises(RecordError, match="token ids outside"):
        decode_record(record(bad), shapes, 1 << 20)


@pytest.mark.slow  # pirl-init as a process
def test_pirl_init_wraps_a_lerobot_checkpoint_with_dataset_stats(tmp_path):
    """pirl-init: a LeRobot SmolVLA checkpoint + a LeRobot dataset -> a pi_rl pretrained_model that
    load_policy (the learner's and the edge's loader) reads back and samples from."""
    import subprocess
    import sys
    from pathlib import Path

    from lerobot_policy_pi_rl.sft import load_policy, record_demos

    donor, _, _ = vla_policy("smolvla", seed=7)
    donor.backbone.base.save_pretrained(tmp_path / "base")
    record_demos(tmp_path / "data", 2, obs_type="pixels_agent_pos", image_size=IMAGE)
    cmd = [
        str(Path(sys.executable).parent / "pirl-init"),
        f"--out={tmp_path / 'policy'}",
        "--backbone=smolvla",
        f"--base_model_path={tmp_path / 'base'}",
        "--dataset_repo_id=local/pirl_reach",
        f"--dataset_root={tmp_path / 'data'}",
        "--reduced={}",
        '--policy_overrides={"backbone_config": {"tokenizer_max_length": 16}, "n_action_steps": 2}',
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trained by PI-RL" in out.stdout
    policy, pre, post = load_policy(tmp_path / "policy")
    assert policy.config.n_action_steps == 2 and policy.config.backbone == "smolvla"
    for (n, a), b in zip(
        donor.backbone.base.state_dict().items(), policy.backbone.base.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), n
    # normalisation stats came from the dataset, not a default
    stats = normalizer_stats(pre)["observation.state"]["mean"]
    assert float(np.abs(np.asarray(stats)).sum()) > 0
    obs = observations(policy, pre, n=2)
    with torch.no_grad():
        s = policy.sample_chains(obs, *policy.draw_noise(2))
    assert torch.isfinite(s.actions).all()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds a policy" in again.stderr


@pytest.mark.parametrize("backbone", BACKBONES)
def test_split_export_with_explicit_kv_cache_tensors(backbone, tmp_path):
    """prefix.onnx hands the VLA's KV cache out as plain tensors; velocity.onnx takes them back for
    each denoise step; with the loop on the host the result equals PyTorch's."""
    from pirl.export.split_export import SplitSampler, export_split

    policy, pre, _ = vla_policy(backbone, noise_method="flow_noise")
    manifest = export_split(policy, tmp_path)
    n_layers = len(policy.backbone.embed_prefix(observations(policy, pre, n=1)).cache.keys)
    # features, keys and values per layer, the pad mask (and pi0's state)
    assert manifest["num_prefix_tensors"] == 1 + 2 * n_layers + 1 + (backbone == "pi0")
    obs = observations(policy, pre, n=3)
    noise = policy.draw_noise(3, generator=torch.Generator().manual_seed(4))
    level = torch.full((3,), 0.5)
    with torch.no_grad():
        ref = policy.sample_chains(obs, *noise, noise_level=level)
    out = SplitSampler(policy, tmp_path).run(
        {k: v.numpy() for k, v in obs.items()}, *(n.numpy() for n in noise), level.numpy()
    )
    np.testing.assert_allclose(out["actions"], ref.actions.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["log_prob"], ref.chain.log_prob.numpy(), rtol=1e-5, atol=1e-4)


def test_bf16_base_model_keeps_the_sampler_in_float32():
    """With the base model in bf16 (LeRobot's own mixed precision: VLM and expert in bf16, vision
    path in float32), velocities, log-probs and values stay float32 and the learner's ratio is 1."""
    policy, pre, _ = vla_policy("pi0", backbone_config={"tokenizer_max_length": LANG, "dtype": "bfloat16"})
    assert (
        policy.backbone.base.model.paligemma_with_expert.gemma_expert.model.layers[0].mlp.up_proj.weight.dtype
        == torch.bfloat16
    )
    obs = observations(policy, pre)
    noise = policy.draw_noise(4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        s = policy.sample_chains(obs, *noise)
        ev = policy.evaluate_chains(obs, s.chain.chain, s.chain.stochastic, s.noise_level)
    assert s.chain.chain.dtype == torch.float32 and s.chain.log_prob.dtype == torch.float32
    assert torch.isfinite(s.chain.chain).all()
    torch.testing.assert_close((ev.log_prob - s.chain.log_prob).exp(), torch.ones(4), rtol=0, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_update_gradient():
    """LeRobot's gradient checkpointing (backbone_config) on the expert: same log-prob gradient as
    without, and the prefix forward still fills its KV cache in training mode."""
    grads = []
    for gc in (False, True):
        policy, pre, _ = vla_policy("pi0", backbone_config={"tokenizer_max_length": LANG, "gradient_checkpointing": gc})
        obs = observations(policy, pre)
        noise = policy.draw_noise(4, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            s = policy.sample_chains(obs, *noise)
        policy.train()
        ev = policy.evaluate_chains(obs, s.chain.chain, s.chain.stochastic, s.noise_level)
        ev.log_prob.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.backbone.expert_parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a full-size SmolVLA
def test_offline_smolvlm2_config_builds_smolvla_at_its_published_size():
    """The SmolVLM2-500M architecture written out for offline full-size timing: LeRobot's SmolVLA
    built on it (16 of the 32 text layers, its default) has SmolVLA's published 0.45 B parameters,
    and the text / vision parts have SmolLM2-360M's and SigLIP-base's shapes."""
    from transformers import AutoConfig, AutoTokenizer

    from lerobot_policy_pi_rl.backbones.smolvlm2_offline import smolvlm2_500m_dir

    d = smolvlm2_500m_dir()
    loaded = AutoConfig.from_pretrained(d)
    assert (
        loaded.text_config.hidden_size,
        loaded.text_config.num_hidden_layers,
        loaded.vision_config.image_size,
        loaded.scale_factor,
    ) == (960, 32, 512, 4)
    assert len(AutoTokenizer.from_pretrained(d)) <= loaded.text_config.vocab_size
    feats = {
        "observation.images.cam0": PolicyFeature(FeatureType.VISUAL, (3, 224, 224)),
        "observation.state": PolicyFeature(FeatureType.STATE, (8,)),
    }
    cfg = PiRLConfig(
        device="cpu",
        backbone="smolvla",
        chunk_size=50,
        n_action_steps=5,
        input_features=feats,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (7,))},
        backbone_config={"vlm_model_name": str(d), "load_vlm_weights": False},
    )
    policy = PiRLPolicy(cfg)
    vlm = policy.backbone.model.vlm_with_expert
    total = sum(p.numel() for p in policy.parameters())
    assert 0.44e9 < total < 0.46e9, total
    assert len(vlm.get_vlm_model().text_model.layers) == 16 and vlm.lm_expert.config.hidden_size == 720


@pytest.mark.slow  # a full-size SmolVLA
def test_full_size_smolvla_from_the_hub_without_a_network_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import sys

    from pirl_tools import bench

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "pirl-bench",
            "infer",
            f"--out={tmp_path}",
            "--backbone=smolvla",
            "--size=full",
            "--backends=[torch_eager]",
        ],
    )
    with pytest.raises(SystemExit) as exc:
        bench.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith("error: ") and "smolvlm_config=offline" in err[-1]

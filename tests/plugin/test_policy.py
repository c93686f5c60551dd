"""The ``pi_rl`` LeRobot plugin: discovery, config validation, save/load, SFT loss, RL API."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature

from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig, PiRLConfigError
from lerobot_policy_pi_rl.modeling_pi_rl import PiRLPolicy

STATE, ACTION_DIM = 6, 3


def make_config(**kw) -> PiRLConfig:
    kw.setdefault("input_features", {"observation.state": PolicyFeature(FeatureType.STATE, (STATE,))})
    kw.setdefault("output_features", {"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))})
    return PiRLConfig(device="cpu", **kw)


def make_batch(cfg: PiRLConfig, batch_size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"observation.state": torch.randn(batch_size, STATE, generator=g)}
    for key, ft in cfg.image_features.items():
        batch[key] = torch.rand(batch_size, *ft.shape, generator=g)
    batch["action"] = torch.randn(batch_size, cfg.chunk_size, ACTION_DIM, generator=g)
    return batch


@pytest.mark.slow  # a fresh interpreter
def test_plugin_discovered_by_lerobot_in_fresh_interpreter():
    """No import of ours: LeRobot's own plugin discovery must find the policy and the env."""
    code = textwrap.dedent(
        """
        import json, sys
        from lerobot.utils.import_utils import register_third_party_plugins
        register_third_party_plugins()
        from lerobot.envs.configs import EnvConfig
        from lerobot.policies.factory import make_policy, make_policy_config, make_pre_post_processors
        cfg = make_policy_config("pi_rl", device="cpu")
        env_cfg = EnvConfig.get_choice_class("pirl_reach")()
        policy = make_policy(cfg, env_cfg=env_cfg)
        pre, post = make_pre_post_processors(cfg)
        print(json.dumps({"type": cfg.type, "cls": type(policy).__name__,
                          "module": type(policy).__module__, "pre": pre.name, "post": post.name}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info == {
        "type": "pi_rl",
        "cls": "PiRLPolicy",
        "module": "lerobot_policy_pi_rl.modeling_pi_rl",
        "pre": "policy_preprocessor",
        "post": "policy_postprocessor",
    }


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("noise_method", "flow_magic", "policy.noise_method"),
        ("num_denoise_steps", 0, "policy.num_denoise_steps"),
        ("n_action_steps", 9, "policy.n_action_steps"),
        ("critic_placement", "vlm", "policy.critic_placement"),
        ("backbone", "gpt", "policy.backbone"),
        ("noise_std_min", 0.5, "policy.noise_std_min"),
    ],
)
def test_bad_config_names_the_field(field, value, match):
    with pytest.raises(PiRLConfigError, match=match):
        make_config(**{field: value})


def test_bad_features_name_the_feature():
    with pytest.raises(PiRLConfigError, match="'action'"):
        PiRLPolicy(make_config(output_features={}))
    with pytest.raises(PiRLConfigError, match="observation.state"):
        PiRLPolicy(make_config(input_features={"observation.state": PolicyFeature(FeatureType.STATE, (2, 3))}))
    with pytest.raises(PiRLConfigError, match="max_action_dim"):
        PiRLPolicy(make_config(max_action_dim=2))


def test_mismatched_batch_shapes_give_clear_errors():
    cfg = make_config()
    policy = PiRLPolicy(cfg)
    batch = make_batch(cfg)
    batch["action"] = batch["action"][:, :3]
    with pytest.raises(ValueError, match="chunk_size=8"):
        policy.forward(batch)
    with pytest.raises(KeyError, match="'action'"):
        policy.forward({"observation.state": batch["observation.state"]})


@pytest.mark.parametrize("with_image", [False, True])
def test_save_load_round_trip_gives_identical_actions(tmp_path, with_image):
    torch.manual_seed(0)
    feats = {"observation.state": PolicyFeature(FeatureType.STATE, (STATE,))}
    if with_image:
        feats["observation.image"] = PolicyFeature(FeatureType.VISUAL, (3, 16, 16))
    cfg = make_config(input_features=feats, noise_method="flow_noise", critic_placement="expert", max_action_dim=5)
    policy = PiRLPolicy(cfg)
    # move every parameter off its init so a silently missing key would show
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    policy.save_pretrained(tmp_path)
    loaded = PiRLPolicy.from_pretrained(tmp_path, strict=True)
    assert loaded.config.noise_method == "flow_noise" and loaded.config.max_action_dim == 5
    batch = make_batch(cfg)
    noise = torch.randn(5, cfg.chunk_size, 5)
    torch.testing.assert_close(
        policy.predict_action_chunk(batch, noise=noise), loaded.predict_action_chunk(batch, noise=noise), rtol=0, atol=0
    )
    n = policy.draw_noise(5, generator=torch.Generator().manual_seed(1))
    a, b = policy.sample_chains(batch, *n), loaded.sample_chains(batch, *n)
    assert torch.equal(a.chain.chain, b.chain.chain) and torch.equal(a.value, b.value)
    assert torch.equal(a.chain.log_prob, b.chain.log_prob)


def test_flow_matching_loss_trains():
    torch.manual_seed(0)
    cfg = make_config()
    policy = PiRLPolicy(cfg)
    batch = make_batch(cfg, batch_size=32)
    opt = torch.optim.Adam(policy.get_optim_params(), lr=3e-3)
    first = None
    for _ in range(150):
        loss, info = policy.forward(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert set(info) == {"flow_matching_loss"}


def test_flow_matching_loss_ignores_padded_positions():
    torch.manual_seed(0)
    cfg = make_config()
    policy = PiRLPolicy(cfg)
    batch = make_batch(cfg)
    batch["action_is_pad"] = torch.zeros(5, cfg.chunk_size, dtype=torch.bool)
    batch["action_is_pad"][:, 4:] = True
    torch.manual_seed(1)
    loss_a, _ = policy.forward(batch)
    batch["action"][:, 4:] += 100.0
    torch.manual_seed(1)
    loss_b, _ = policy.forward(batch)
    # padded targets do not count (the network input x_t changes only in padded tokens' noise mix,
    # so compare with a tolerance that a counted +100 offset would blow through)
    assert abs(loss_a.item() - loss_b.item()) < 0.5 * loss_a.item() + 1.0


def test_select_action_executes_n_action_steps_per_chunk():
    cfg = make_config(n_action_steps=3)
    policy = PiRLPolicy(cfg)
    batch = make_batch(cfg, batch_size=2)
    del batch["action"]
    calls = []
    orig = policy.predict_action_chunk
    policy.predict_action_chunk = lambda b, **k: calls.append(1) or orig(b, **k)
    actions = [policy.select_action(batch) for _ in range(7)]
    assert len(calls) == 3 and actions[0].shape == (2, ACTION_DIM)


@pytest.mark.parametrize("method,hybrid", [("flow_noise", False), ("flow_sde", False), ("flow_sde", True)])
@pytest.mark.parametrize("placement", ["prefix", "expert"])
def test_policy_replay_ratio_is_one(method, hybrid, placement):
    torch.manual_seed(0)
    cfg = make_config(noise_method=method, hybrid=hybrid, critic_placement=placement, max_action_dim=4)
    policy = PiRLPolicy(cfg)
    batch = make_batch(cfg, batch_size=16)
    with torch.no_grad():
        sample = policy.sample_chains(batch, *policy.draw_noise(16, generator=torch.Generator().manual_seed(2)))
    ev = policy.evaluate_chains(batch, sample.chain.chain, sample.chain.stochastic, sample.noise_level)
    torch.testing.assert_close(torch.exp(ev.log_prob - sample.chain.log_prob), torch.ones(16), rtol=0, atol=1e-5)
    torch.testing.assert_close(ev.value, sample.value, rtol=0, atol=1e-6)
    # log-prob only counts executed positions and real dims
    assert sample.chain.log_prob.abs().min() > 0
    if method == "flow_noise":
        assert torch.all(ev.entropy < 0)  # std in [0.08, 0.16] -> differential entropy < 0


def test_rl_parameter_groups_follow_config():
    policy = PiRLPolicy(make_config(noise_method="flow_sde"))
    actor = {id(p) for p in policy.rl_actor_parameters()}
    assert {id(p) for p in policy.backbone.expert_parameters()} <= actor
    assert not {id(p) for p in policy.backbone.prefix_parameters()} & actor
    assert not {id(p) for p in policy.noise_head.parameters()} & actor
    noisy = PiRLPolicy(make_config(noise_method="flow_noise", rl_train_prefix=True))
    actor = {id(p) for p in noisy.rl_actor_parameters()}
    assert {id(p) for p in noisy.noise_head.parameters()} <= actor
    assert {id(p) for p in noisy.backbone.prefix_parameters()} <= actor


def test_noise_level_anneal():
    cfg = make_config(noise_level=0.8, noise_level_final=0.4, noise_anneal_updates=10)
    assert cfg.noise_level_at(0) == 0.8
    assert abs(cfg.noise_level_at(5) - 0.6) < 1e-9
    assert abs(cfg.noise_level_at(50) - 0.4) < 1e-9


def test_nothing_to_train_in_rl_is_a_config_error():
    with pytest.raises(PiRLConfigError, match="policy.rl_train_expert"):
        make_config(rl_train_expert=False, noise_method="flow_sde")
    with pytest.raises(PiRLConfigError, match="policy.noise_level_final"):
        make_config(noise_level_final=-1.0)

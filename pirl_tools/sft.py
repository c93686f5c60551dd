"""pirl-sft: record scripted demonstrations as a LeRobotDataset, behaviour-clone ``pi_rl`` on it with
LeRobot's training loop, and report the deterministic success of the result.

    pirl-sft --out=DIR [--num_demos=10] [--steps=2000] [--seed=0] [--eval_episodes=200] [--backbone=mlp]
    pirl-sft --out=DIR --env.type=TYPE [--env.task=...] --expert=module:callable      # any LeRobot env type
    pirl-sft --out=DIR --sim_env=GYM_ID [--env_kwargs='{...}'] [--success_key=success] --expert=module:callable
    pirl-sft --out=DIR --dataset_root=DIR --dataset_repo_id=ID [--env.type=... | --sim_env=...]   # your demos

Without an env or a dataset it records the built-in task's scripted expert. Writes DIR/data (the dataset,
unless one is given), DIR/train (LeRobot checkpoints) and DIR/sft.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lerobot.envs.configs import EnvConfig

from lerobot_policy_pi_rl.presets import BACKBONE_CHOICES, builtin_policy_overrides
from pirl.cli import parse_config, require, run_cli, write_json
from pirl_tools.common import env_sft_checkpoint, sft_checkpoint


def _run(args) -> int:
    if args.env is None and args.sim_env is None and args.dataset_root is None:
        return _run_builtin(args)
    return _run_any_env(args)


def _run_builtin(args) -> int:
    from lerobot_policy_pi_rl.envs import ReachGraspVecEnv, builtin_obs_kwargs
    from lerobot_policy_pi_rl.rollout import PolicyRunner, evaluate_success
    from lerobot_policy_pi_rl.sft import load_policy

    out = Path(args.out)
    ckpt = sft_checkpoint(
        out,
        seed=args.seed,
        num_demos=args.num_demos,
        steps=args.steps,
        noise_std=args.demo_noise,
        policy_overrides=builtin_policy_overrides(args.backbone),
    )
    policy, pre, post = load_policy(ckpt)
    env = ReachGraspVecEnv(min(args.eval_episodes, 500), autoreset=False, **builtin_obs_kwargs(policy.config))
    success = evaluate_success(PolicyRunner(policy, pre, post), env, episodes=args.eval_episodes, seed=1_000_000)
    return _report(args, ckpt, success, "pirl_reach")


def _run_any_env(args) -> int:
    """Demos from ``--expert`` on the given env (or ``--dataset_root``), SFT with LeRobot's train loop, and the
    deterministic success on that env (none without an env)."""
    from lerobot_policy_pi_rl.envs import open_sim_env, sim_env_kwargs
    from lerobot_policy_pi_rl.rollout import PolicyRunner, env_mismatch, evaluate_success
    from lerobot_policy_pi_rl.sft import load_policy

    out = Path(args.out)
    target = args.env if args.env is not None else args.sim_env
    field = f"env.type={args.env.type}" if args.env is not None else f"sim_env={args.sim_env}"
    kwargs = sim_env_kwargs(target, None, args.success_key, args.env_kwargs) if target is not None else {}
    ckpt = env_sft_checkpoint(
        out,
        target,
        kwargs,
        field,
        expert=args.expert,
        num_demos=args.num_demos,
        steps=args.steps,
        seed=args.seed,
        noise_std=args.demo_noise,
        fps=args.fps,
        repo_id=args.dataset_repo_id,
        dataset_root=Path(args.dataset_root) if args.dataset_root else None,
        policy_overrides=builtin_policy_overrides(args.backbone),
        start_states=args.start_states,
    )
    if target is None:
        return _report(args, ckpt, None, None)
    policy, pre, post = load_policy(ckpt)
    env = open_sim_env(target, min(args.eval_episodes, 500), field, autoreset=False, **kwargs)
    runner = PolicyRunner.for_env(policy, pre, post, env)
    why = env_mismatch(runner, env)
    if why is not None:
        raise ValueError(f"{field} does not fit the trained policy: {why}")
    success = evaluate_success(runner, env, episodes=args.eval_episodes, seed=1_000_000)
    return _report(args, ckpt, success, field)


def _report(args, ckpt: Path, success: float | None, env: str | None) -> int:
    if success is not None:
        print(f"SFT deterministic success over {args.eval_episodes} episodes: {success:.3f}")
    print(f"checkpoint: {ckpt}")
    write_json(
        Path(args.out) / "sft.json",
        {
            "checkpoint": str(ckpt),
            "sft_success": success,
            "env": env,
            "backbone": args.backbone,
            "num_demos": args.num_demos,
            "steps": args.steps,
            "seed": args.seed,
            "eval_episodes": args.eval_episodes,
        },
    )
    return 0


@dataclass
class SFTConfig:
    """pirl-sft: record scripted demonstrations (the built-in task's, or an expert's on any env), behaviour-clone
    the pi_rl policy with LeRobot's train loop, report its deterministic success (OUT/sft.json)."""

    # output directory (a finished checkpoint there is reused) (required)
    out: str | None = None
    # scripted demonstrations to record
    num_demos: int = 10
    # std of the noise in the scripted expert's actions
    demo_noise: float = 0.1
    # flow-matching training steps
    steps: int = 2000
    # seed of the demonstrations, the training and the evaluation
    seed: int = 0
    # episodes of the deterministic evaluation
    eval_episodes: int = 200
    # velocity field: the small MLP (state), or LeRobot's pi0 / pi05 / smolvla at a reduced CPU size (camera
    # image + state + task instruction)
    backbone: str = "mlp"
    # a LeRobot env type to record and evaluate on, as lerobot-eval takes it (--env.type=... --env.task=...; an
    # installed lerobot_env_* plugin's too). None: sim_env, or the built-in task
    env: EnvConfig | None = None
    # or a gymnasium id ('module:id' imports the module first, e.g. 'metaworld:Meta-World/MT1') or an env a
    # plugin registers (e.g. 'pirl_sim')
    sim_env: str | None = None
    # keyword arguments of sim_env (gymnasium.make's for a gymnasium id, e.g. '{env_name: reach-v3}')
    env_kwargs: dict = field(default_factory=dict)
    # the info key the env reports success under (LeRobot's 'is_success'; MetaWorld's gymnasium envs: 'success')
    success_key: str = "is_success"
    # the scripted expert that records the demos on env / sim_env, as module:callable: expert(obs, env) -> actions
    # [num_envs, action_dim] from the vector env's raw observation dict (lerobot_policy_pi_rl/demos.py)
    expert: str | None = None
    # an existing local LeRobotDataset to behaviour-clone instead of recording demos
    dataset_root: str | None = None
    # the repo id of that dataset, or of the one recorded
    dataset_repo_id: str = "local/pirl_demos"
    # frame rate written into a recorded dataset (the env's control rate)
    fps: int = 50
    # env resets whose start-state observations widen a recorded dataset's state normalisation statistics, so
    # that a dim the few demos never varied (an object's start position) keeps its spread (0: the demos' only;
    # the built-in task's recorder does not use it)
    start_states: int = 256

    def __post_init__(self):
        if not self.out:
            raise ValueError("out: required (the output directory)")
        if self.env is not None and self.sim_env is not None:
            raise ValueError("sim_env: give --env.type or --sim_env, not both")
        if (self.env is not None or self.sim_env is not None) and self.dataset_root is None and not self.expert:
            raise ValueError(
                "expert: recording demos on your env needs a scripted expert (--expert=module:callable), or give "
                "your own demonstrations with --dataset_root"
            )
        if self.expert and self.env is None and self.sim_env is None:
            raise ValueError("expert: it records on --env.type=... or --sim_env=...: give one")
        require(self, at_least={"num_demos": 1, "steps": 1, "eval_episodes": 1, "demo_noise": 0, "start_states": 0})
        if self.backbone not in BACKBONE_CHOICES:
            raise ValueError(f"backbone: must be one of {BACKBONE_CHOICES} (got {self.backbone!r})")


def main() -> None:
    from lerobot.utils.import_utils import register_third_party_plugins

    register_third_party_plugins()  # lerobot_env_* plugins' env types, before --env.type is parsed
    cfg = parse_config(SFTConfig, prog="pirl-sft")
    run_cli(lambda: _run(cfg))


if __name__ == "__main__":
    main()

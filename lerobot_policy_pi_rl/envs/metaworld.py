"""MetaWorld v3 on its full state observation, for the CPU policy; and the MuJoCo 4 fix MetaWorld needs.

``MetaWorldStateEnv`` (gymnasium id ``pirl/MetaWorldState-v3``, ``gym.make(GYM_ID, task="push-v3")``) is one
MetaWorld task on the 39-dim state MetaWorld's own API serves (hand, gripper, two objects' positions and
quaternions, the previous frame's, the goal), with MetaWorld's scripted expert for demonstrations
(:func:`expert`, ``--expert=lerobot_policy_pi_rl.envs.metaworld:expert``).

Start states (``variants``): ``"mt1"`` (default) is MetaWorld's own benchmark protocol, one of the task's 50 MT1
train variants (fixed object and goal positions) per episode; ``"random"`` is what LeRobot's
``--env.type=metaworld`` env (a 480x480 image and a 4-dim state, for VLA backbones) does, object and goal
positions drawn anew from MetaWorld's reset ranges. Either way ``reset(seed=s)`` decides the start, so seeds are
honoured. An episode ends at success (``info["is_success"]``, as LeRobot's env does) or after
``max_episode_steps``.

MetaWorld 3.0.0 (LeRobot 0.6.1's pin) writes 11 numbers into each weld constraint's ``eq_data`` row; MuJoCo 4
made that row 12 wide, so every MetaWorld env fails to build ("could not broadcast input array from shape (11,)
into shape (12,)"). :func:`patch_for_mujoco` writes the same 11 numbers and leaves the twelfth at the value
MuJoCo compiled (its default, 1). It is applied before any MetaWorld env is built here and by ``LeRobotVecEnv``
for ``--env.type=metaworld``; the scripted experts solve the MT10 tasks under it (9-10 of 10 episodes each).
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np

# LeRobot's metaworld env type renders offscreen: EGL (Mesa's software driver on a CPU box) unless the user chose
# (MUJOCO_GL=osmesa); read when MuJoCo's renderer is first set up, so set before any MetaWorld env is built
os.environ.setdefault("MUJOCO_GL", "egl")

GYM_ID = "pirl/MetaWorldState-v3"
DEFAULT_TASK = "reach-v3"
REWARDS = ("success", "dense")  # MetaWorldStateEnv's reward choices
VARIANTS = ("mt1", "random")  # its start-state choices

# the ten MT10 tasks, in MetaWorld's order
MT10_TASKS = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)

# the weld row MetaWorld resets its mocap welds to: anchor (3), relative pose (3 + quaternion 4), torque scale
_MOCAP_WELD = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 5.0)


def _import_metaworld():
    try:
        import metaworld
    except ImportError as e:
        raise ImportError(
            f"MetaWorld is not installed ({e}); `pip install -e '.[metaworld]'` (metaworld==3.0.0, LeRobot's pin)"
        ) from e
    return metaworld


def patch_for_mujoco() -> None:
    """Make MetaWorld's mocap-weld reset write only the fields it knows (a no-op where the row is 11 wide)."""
    import mujoco

    _import_metaworld()
    from metaworld.sawyer_xyz_env import SawyerMocapBase

    if getattr(SawyerMocapBase.reset_mocap_welds, "_pirl_patched", False):
        return

    def reset_mocap_welds(self) -> None:
        if self.model.nmocap > 0 and self.model.eq_data is not None:
            for i in range(self.model.eq_data.shape[0]):
                if self.model.eq_type[i] == mujoco.mjtEq.mjEQ_WELD:
                    self.model.eq_data[i, : len(_MOCAP_WELD)] = _MOCAP_WELD

    reset_mocap_welds._pirl_patched = True
    SawyerMocapBase.reset_mocap_welds = reset_mocap_welds


def task_descriptions() -> dict[str, str]:
    """MetaWorld task -> the instruction LeRobot's metaworld env gives VLA backbones."""
    import json
    from importlib.resources import files

    return json.loads(files("lerobot.envs").joinpath("metaworld_config.json").read_text())["TASK_DESCRIPTIONS"]


class MetaWorldStateEnv(gym.Env):
    """One MetaWorld v3 task on its 39-dim state.

    Args:
        task: a MetaWorld v3 task name, e.g. ``"push-v3"`` (``MT10_TASKS`` lists MT10's).
        max_episode_steps: steps before an episode is truncated (MetaWorld's own limit is 500; its scripted
            experts solve the MT10 tasks well inside 150).
        reward: ``"success"``: 1 at the step the task succeeds (the episode ends there), else 0 -- the
            benchmark's own measure, and what the PI-RL paper's benchmark runs learn from; ``"dense"``: MetaWorld's
            shaped reward divided by 10 (it is 0-10 per step).
        variants: ``"mt1"``: one of the 50 MT1 train variants per episode; ``"random"``: positions drawn from the
            reset ranges (LeRobot's metaworld env).
    """

    metadata = {"render_modes": []}

    def __init__(
        self, task: str = DEFAULT_TASK, max_episode_steps: int = 150, reward: str = "success", variants: str = "mt1"
    ):
        if reward not in REWARDS:
            raise ValueError(f"reward: 'success' or 'dense' (got {reward!r})")
        if variants not in VARIANTS:
            raise ValueError(f"variants: 'mt1' or 'random' (got {variants!r})")
        patch_for_mujoco()
        metaworld = _import_metaworld()
        if task not in metaworld.ALL_V3_ENVIRONMENTS:
            raise ValueError(
                f"unknown MetaWorld task {task!r}; the v3 tasks are {sorted(metaworld.ALL_V3_ENVIRONMENTS)}"
            )
        if int(max_episode_steps) < 1 or int(max_episode_steps) > 500:
            raise ValueError(f"max_episode_steps must be in [1, 500] (MetaWorld's limit), got {max_episode_steps}")
        self.task, self.reward = task, reward
        self.max_episode_steps = self._max_episode_steps = int(max_episode_steps)  # the second for gymnasium
        mt1 = metaworld.MT1(task, seed=42)
        env = mt1.train_classes[task]()
        env.set_task(mt1.train_tasks[0])
        self._variants = list(mt1.train_tasks) if variants == "mt1" else None
        if variants == "random":
            env._freeze_rand_vec = False  # draw object and goal positions at every reset ...
            env.seeded_rand_vec = True  # ... from env.np_random, which reset(seed=...) reseeds
        env.max_path_length = max(env.max_path_length, self.max_episode_steps)
        self._env = env
        self.task_description = task_descriptions().get(task, task)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, env.action_space.shape, np.float32)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if self._variants is not None:  # the variant from this env's generator (reseeded by a seed)
            self._env.set_task(self._variants[int(self.np_random.integers(len(self._variants)))])
        elif seed is not None:
            self._env.seed(int(seed))
        obs, _ = self._env.reset()
        self._t = 0
        return obs.astype(np.float32), {"is_success": False}

    def step(self, action):
        obs, reward, _, _, info = self._env.step(np.asarray(action, dtype=np.float64))
        self._t += 1
        success = bool(info.get("success", 0.0))
        info = {**info, "is_success": success}
        reward = float(success) if self.reward == "success" else float(reward) / 10.0
        return obs.astype(np.float32), reward, success, self._t >= self.max_episode_steps, info

    def close(self) -> None:
        self._env.close()


def register_gym_env() -> None:
    """Register ``GYM_ID`` (cheap: MetaWorld is imported when an env is made)."""
    if GYM_ID not in gym.registry:
        gym.register(id=GYM_ID, entry_point=f"{__name__}:MetaWorldStateEnv")


_EXPERTS: dict[str, Any] = {}


def expert(obs: dict[str, Any], env) -> np.ndarray:
    """MetaWorld's scripted policy for the env's task, in the ``expert(obs, env)`` form of ``demos.py``, for a vector
    env of ``MetaWorldStateEnv`` (``--sim_env=pirl/MetaWorldState-v3 --env_kwargs='{task: push-v3}'``)."""
    patch_for_mujoco()
    from metaworld.policies import ENV_POLICY_MAP

    task = (getattr(env, "make_kwargs", None) or {}).get("task", DEFAULT_TASK)
    if task not in _EXPERTS:
        if task not in ENV_POLICY_MAP:
            raise ValueError(f"MetaWorld has no scripted policy for {task!r}")
        _EXPERTS[task] = ENV_POLICY_MAP[task]()
    policy = _EXPERTS[task]
    state = np.asarray(obs["agent_pos"], dtype=np.float64)
    return np.stack([policy.get_action(row) for row in state]).astype(np.float32)

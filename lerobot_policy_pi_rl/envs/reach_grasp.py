"""Reach-and-grasp: a small, manipulation-flavoured CPU task with a sparse binary reward.

A point end-effector moves in the 2-D workspace ``[-1, 1]^2`` with a little inertia and has to stop on
a target and close its gripper there. Closing the gripper always ends the episode: it is a success
(reward 1) only when the end-effector is within ``success_radius`` of the target *and* slower than
``max_speed_at_grasp``; otherwise it is a failed grasp (reward 0). Running out of steps truncates the
episode with reward 0. That makes the task a good probe for RL fine-tuning of an imitation policy:
a behaviour-cloned policy gets close, but the precise "stop, then close" timing is what the reward
sharpens.

Everything is batched numpy: :class:`ReachGraspVecEnv` holds ``num_envs`` copies as arrays and steps
them without a Python loop (only the rejection sampling of reset positions runs per env, with that
env's own generator). :class:`ReachGraspEnv` is the single-env ``gymnasium.Env`` view used by
LeRobot's env factory (gym id :data:`GYM_ID`).

Dynamics (per control step, ``dt`` seconds)::

    v <- inertia * v + (1 - inertia) * max_vel * clip(a_xy, -1, 1)
    p <- clip(p + v, -1, 1)          (a velocity component that hits a wall is zeroed)

then, if ``grip > 0``, the grasp is judged on the *new* state. Observation ``agent_pos`` is
``(p, v / max_vel, g)`` as float32 (the velocity is scaled to O(1)).

Seeding: every env owns a ``np.random.Generator``. ``reset(seed=s)`` gives env ``i`` the generator
``np.random.default_rng(s + i)``; ``reset(seed=[s_0, ..., s_{N-1}])`` gives env ``i``
``default_rng(s_i)`` (so envs given the same seed start in the identical state, as GRPO groups need);
``reset(seed=None)`` keeps the generators running. Resets (explicit or automatic) are the only
consumers of randomness, one draw sequence per env, so a vectorised env and N single envs seeded
``s + i`` produce bit-identical trajectories, autoresets included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from lerobot_policy_pi_rl.envs.vector import active_mask, reset_targets

__all__ = [
    "GYM_ID",
    "GYM_NAMESPACE",
    "GYM_TASK",
    "TASK_DESCRIPTION",
    "ReachGraspEnv",
    "ReachGraspVecEnv",
    "register_gym_envs",
    "scripted_expert",
]

TASK_DESCRIPTION = "reach the target and grasp it"
GYM_NAMESPACE = "pirl"
GYM_TASK = "ReachGrasp-v0"
GYM_ID = f"{GYM_NAMESPACE}/{GYM_TASK}"

OBS_TYPES = ("state", "pixels_agent_pos")

# Defaults shared by the env and the scripted expert.
DEFAULT_MAX_VEL = 0.1
DEFAULT_INERTIA = 0.6
DEFAULT_SUCCESS_RADIUS = 0.06
DEFAULT_MAX_SPEED_AT_GRASP = 0.05

_BG = np.array([40, 40, 48], dtype=np.float32)
_TARGET_RGB = np.array([40, 200, 70], dtype=np.float32)
_EE_RGB = np.array([220, 50, 40], dtype=np.float32)
_TARGET_DRAW_RADIUS = 0.15  # world units; larger than success_radius so it is visible at 32 px
_EE_DRAW_RADIUS = 0.10


def _norm2(x: np.ndarray) -> np.ndarray:
    """Euclidean norm over the last axis (size 2), written out so it is batch-size independent."""
    return np.sqrt(x[..., 0] * x[..., 0] + x[..., 1] * x[..., 1])


def _render_discs(p: np.ndarray, g: np.ndarray, size: int) -> np.ndarray:
    """Render [N, size, size, 3] uint8 images: green target disc under a red end-effector disc.

    Row 0 is the top (y = +1), column 0 the left (x = -1). Disc edges are anti-aliased over one pixel,
    so sub-pixel motion still changes the image. Batched over N (no per-env loop).
    """
    px = 2.0 / size
    c = ((np.arange(size, dtype=np.float64) + 0.5) * px - 1.0).astype(np.float32)
    xs = c[None, None, :]
    ys = -c[None, :, None]

    def coverage(center: np.ndarray, radius: float) -> np.ndarray:
        center = center.astype(np.float32)
        dx = xs - center[:, 0, None, None]
        dy = ys - center[:, 1, None, None]
        d = np.sqrt(dx * dx + dy * dy)
        cov = (np.float32(radius) - d) * np.float32(1.0 / px) + np.float32(0.5)
        return np.clip(cov, 0.0, 1.0, out=cov)

    a_t = coverage(g, _TARGET_DRAW_RADIUS)
    a_e = coverage(p, _EE_DRAW_RADIUS)
    out = np.empty((p.shape[0], size, size, 3), dtype=np.uint8)
    for ch in range(3):  # three colour channels, each a batched [N, S, S] blend
        img = _BG[ch] + a_t * (_TARGET_RGB[ch] - _BG[ch])
        img += a_e * (_EE_RGB[ch] - img)
        out[..., ch] = np.rint(img)
    return out


class ReachGraspVecEnv:
    """``num_envs`` reach-and-grasp envs stepped together in numpy.

    Vector-env protocol (shared with :class:`~lerobot_policy_pi_rl.envs.gym_adapter.GymVecAdapter`):
    ``num_envs``, ``action_dim``, ``state_dim``, ``max_steps``, ``obs_type``, ``action_low``,
    ``action_high``, ``reset(seed=None, options=None) -> (obs, info)``,
    ``step(actions, active=None) -> (obs, reward, terminated, truncated, info)`` with same-step
    autoreset and ``info["final_obs"]``, ``info["is_success"]``, ``info["done"]``.

    Args:
        num_envs: batch size.
        max_steps: steps per episode before truncation.
        success_radius: max distance end-effector/target for a successful grasp.
        max_speed_at_grasp: max end-effector speed (world units per step) for a successful grasp.
        obs_type: ``"state"`` (``agent_pos`` only) or ``"pixels_agent_pos"`` (also ``pixels``).
        image_size: side of the ``pixels`` observation.
        render_size: side of the image returned by :meth:`render`.
        max_vel: terminal speed per step at full command.
        inertia: velocity carry-over factor in ``[0, 1)``.
        dt: seconds per control step (informational: the control rate is ``1 / dt``).
        min_start_distance: minimum initial end-effector/target distance.
        autoreset: reset finished envs within the same ``step`` call. With ``False`` finished envs
            stay finished (stepping them is a no-op) until :meth:`reset`.
        seed: seed for the initial generators and the initial reset (env ``i`` gets ``seed + i``).
    """

    action_dim = 3
    state_dim = 6

    def __init__(
        self,
        num_envs: int = 1,
        *,
        max_steps: int = 60,
        success_radius: float = DEFAULT_SUCCESS_RADIUS,
        max_speed_at_grasp: float = DEFAULT_MAX_SPEED_AT_GRASP,
        obs_type: str = "state",
        image_size: int = 32,
        render_size: int = 128,
        max_vel: float = DEFAULT_MAX_VEL,
        inertia: float = DEFAULT_INERTIA,
        dt: float = 0.02,
        min_start_distance: float = 0.4,
        autoreset: bool = True,
        seed: int | None = None,
    ):
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if obs_type not in OBS_TYPES:
            raise ValueError(f"obs_type must be one of {OBS_TYPES}, got {obs_type!r}")
        if int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if not 0.0 <= inertia < 1.0:
            raise ValueError(f"inertia must be in [0, 1), got {inertia}")
        if int(image_size) < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.num_envs = int(num_envs)
        self.max_steps = int(max_steps)
        self.success_radius = float(success_radius)
        self.max_speed_at_grasp = float(max_speed_at_grasp)
        self.obs_type = obs_type
        self.image_size = int(image_size)
        self.render_size = int(render_size)
        self.max_vel = float(max_vel)
        self.inertia = float(inertia)
        self.dt = float(dt)
        self.min_start_distance = float(min_start_distance)
        self.autoreset = bool(autoreset)
        self.task = TASK_DESCRIPTION
        self.task_description = TASK_DESCRIPTION
        self.action_low = -np.ones(self.action_dim, dtype=np.float32)
        self.action_high = np.ones(self.action_dim, dtype=np.float32)

        n = self.num_envs
        self._p = np.zeros((n, 2))
        self._v = np.zeros((n, 2))
        self._g = np.zeros((n, 2))
        self._t = np.zeros(n, dtype=np.int64)
        self._done = np.zeros(n, dtype=bool)
        if seed is None:
            self._rngs = [np.random.default_rng() for _ in range(n)]
        else:
            self._rngs = [np.random.default_rng(int(seed) + i) for i in range(n)]
        self.reset()

    # ------------------------------------------------------------------ spaces / metadata
    @property
    def fps(self) -> float:
        return 1.0 / self.dt

    @property
    def single_observation_space(self) -> gym.spaces.Dict:
        spaces: dict[str, gym.spaces.Space] = {
            "agent_pos": gym.spaces.Box(-1.0, 1.0, shape=(self.state_dim,), dtype=np.float32)
        }
        if self.obs_type == "pixels_agent_pos":
            spaces["pixels"] = gym.spaces.Box(0, 255, shape=(self.image_size, self.image_size, 3), dtype=np.uint8)
        return gym.spaces.Dict(spaces)

    @property
    def single_action_space(self) -> gym.spaces.Box:
        return gym.spaces.Box(-1.0, 1.0, shape=(self.action_dim,), dtype=np.float32)

    # ------------------------------------------------------------------ core
    def _reset_one(self, i: int) -> None:
        rng = self._rngs[i]
        p = rng.uniform(-0.9, 0.9, size=2)
        while True:
            g = rng.uniform(-0.8, 0.8, size=2)
            d = g - p
            if np.sqrt(d[0] * d[0] + d[1] * d[1]) >= self.min_start_distance:
                break
        self._p[i] = p
        self._v[i] = 0.0
        self._g[i] = g
        self._t[i] = 0
        self._done[i] = False

    def _obs(self, idx: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Observation of all envs, or of the rows ``idx``."""
        p, v, g = (self._p, self._v, self._g) if idx is None else (self._p[idx], self._v[idx], self._g[idx])
        vel = np.clip(v / self.max_vel, -1.0, 1.0)
        obs = {"agent_pos": np.concatenate([p, vel, g], axis=1).astype(np.float32)}
        if self.obs_type == "pixels_agent_pos":
            obs["pixels"] = _render_discs(p, g, self.image_size)
        return obs

    def reset(
        self, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Reset envs and return ``(obs, info)``.

        ``options["reset_mask"]`` (bool [num_envs]) restricts the reset (and the re-seeding) to some
        envs; other option keys are ignored. See the module docstring for the seed semantics.
        """
        n = self.num_envs
        mask, seeds = reset_targets(n, seed, options)
        for i in np.flatnonzero(mask):
            if seeds[i] is not None:
                self._rngs[i] = np.random.default_rng(seeds[i])
        for i in np.flatnonzero(mask):
            self._reset_one(int(i))
        return self._obs(), {"is_success": np.zeros(n, dtype=bool)}

    def step(
        self, actions: np.ndarray, active: np.ndarray | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Advance all (active) envs one control step; see the class docstring for the contract.

        Envs with ``active[i] == False`` are frozen: state unchanged, reward 0, not done.
        """
        n = self.num_envs
        a = np.asarray(actions, dtype=np.float64)
        if a.shape != (n, self.action_dim):
            raise ValueError(f"actions must have shape ({n}, {self.action_dim}), got {a.shape}")
        a = np.clip(np.nan_to_num(a, nan=0.0), -1.0, 1.0)
        m = active_mask(n, active)
        if not self.autoreset:
            m &= ~self._done

        v_cmd = self.inertia * self._v + (1.0 - self.inertia) * self.max_vel * a[:, :2]
        p_raw = self._p + v_cmd
        hit = (p_raw > 1.0) | (p_raw < -1.0)
        p_new = np.clip(p_raw, -1.0, 1.0)
        v_new = np.where(hit, 0.0, v_cmd)
        t_new = self._t + 1

        grasp = m & (a[:, 2] > 0.0)
        dist = _norm2(p_new - self._g)
        speed = _norm2(v_new)
        success = grasp & (dist < self.success_radius) & (speed < self.max_speed_at_grasp)
        terminated = grasp
        truncated = m & ~grasp & (t_new >= self.max_steps)
        done = terminated | truncated

        mm = m[:, None]
        self._p = np.where(mm, p_new, self._p)
        self._v = np.where(mm, v_new, self._v)
        self._t = np.where(m, t_new, self._t)
        elapsed = self._t.copy()

        obs = self._obs()
        final_obs = {k: v.copy() for k, v in obs.items()}
        if self.autoreset:
            done_idx = np.flatnonzero(done)
            if done_idx.size:
                for i in done_idx:
                    self._reset_one(int(i))
                fresh = self._obs(done_idx)
                for k in obs:
                    obs[k][done_idx] = fresh[k]
        else:
            self._done |= done

        info = {
            "final_obs": final_obs,
            "is_success": success,
            "done": done,
            "elapsed_steps": elapsed,
        }
        return obs, success.astype(np.float32), terminated, truncated, info

    # ------------------------------------------------------------------ extras
    def render(self, size: int | None = None) -> np.ndarray:
        """Images of all envs, uint8 [num_envs, size, size, 3] (default ``render_size``)."""
        return _render_discs(self._p, self._g, int(size or self.render_size))

    def get_state(self) -> dict[str, Any]:
        """Copy of the full simulator state, generators included."""
        return {
            "p": self._p.copy(),
            "v": self._v.copy(),
            "g": self._g.copy(),
            "t": self._t.copy(),
            "done": self._done.copy(),
            "rng": [dict(r.bit_generator.state) for r in self._rngs],
        }

    def set_state(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        """Restore a :meth:`get_state` copy; returns the observation of the restored state."""
        n = self.num_envs
        p = np.array(state["p"], dtype=np.float64)
        if p.shape != (n, 2):
            raise ValueError(f"state['p'] must have shape ({n}, 2), got {p.shape}")
        self._p = p
        self._v = np.array(state["v"], dtype=np.float64).reshape(n, 2)
        self._g = np.array(state["g"], dtype=np.float64).reshape(n, 2)
        self._t = np.array(state["t"], dtype=np.int64).reshape(n)
        self._done = np.array(state.get("done", np.zeros(n, dtype=bool)), dtype=bool).reshape(n)
        if "rng" in state:
            for r, s in zip(self._rngs, state["rng"], strict=True):
                r.bit_generator.state = s
        return self._obs()

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_envs={self.num_envs}, max_steps={self.max_steps}, obs_type={self.obs_type!r})"
        )


def scripted_expert(
    obs_agent_pos: np.ndarray,
    rng: np.random.Generator | None = None,
    noise_std: float = 0.0,
    *,
    max_vel: float = DEFAULT_MAX_VEL,
    inertia: float = DEFAULT_INERTIA,
    success_radius: float = DEFAULT_SUCCESS_RADIUS,
    max_speed_at_grasp: float = DEFAULT_MAX_SPEED_AT_GRASP,
    gain: float = 0.3,
) -> np.ndarray:
    """Damped PD expert: actions float32 [N, 3] from ``agent_pos`` observations [N, 6].

    It asks for a next-step velocity ``gain * (g - p)`` capped at ``max_vel`` and inverts the
    first-order velocity dynamics to get the command (``kp * error - kd * velocity``), so it slows
    down geometrically near the target. It closes the gripper (grip = +1) only when within half the
    success radius and slower than half the allowed grasp speed, else grip = -1. Gaussian noise with
    std ``noise_std`` is added to all three components, then actions are clipped to [-1, 1].
    ``max_vel``/``inertia``/radii must match the env's (the defaults do).
    """
    obs = np.asarray(obs_agent_pos, dtype=np.float64)
    if obs.ndim == 1:
        obs = obs[None]
    p, v, g = obs[:, 0:2], obs[:, 2:4] * max_vel, obs[:, 4:6]
    err = g - p
    dist = _norm2(err)
    v_des = gain * err
    sp = _norm2(v_des)
    v_des = v_des * np.minimum(1.0, max_vel / np.maximum(sp, 1e-12))[:, None]
    a_xy = (v_des - inertia * v) / ((1.0 - inertia) * max_vel)
    close = (dist < 0.5 * success_radius) & (_norm2(v) < 0.5 * max_speed_at_grasp)
    grip = np.where(close, 1.0, -1.0)
    act = np.concatenate([a_xy, grip[:, None]], axis=1)
    if noise_std > 0.0:
        if rng is None:
            raise ValueError("scripted_expert needs an rng when noise_std > 0")
        act = act + noise_std * rng.standard_normal(act.shape)
    return np.clip(act, -1.0, 1.0).astype(np.float32)


class ReachGraspEnv(gym.Env):
    """Single reach-and-grasp env (gymnasium API) over ``ReachGraspVecEnv(num_envs=1, autoreset=False)``.

    ``reset(seed=s)`` reproduces env ``0`` of a vec env reset with ``s``, hence env ``i`` of a vec env
    reset with ``s - i``. ``info["is_success"]`` is set on every step. Stepping after the episode ended
    is a no-op until ``reset``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(
        self,
        max_steps: int = 60,
        obs_type: str = "state",
        image_size: int = 32,
        render_mode: str | None = "rgb_array",
        render_size: int = 128,
        success_radius: float = DEFAULT_SUCCESS_RADIUS,
        max_speed_at_grasp: float = DEFAULT_MAX_SPEED_AT_GRASP,
        **kwargs: Any,
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            modes = self.metadata["render_modes"]
            raise ValueError(f"render_mode must be one of {modes}, got {render_mode!r}")
        kwargs.pop("autoreset", None)
        kwargs.pop("num_envs", None)
        self._vec = ReachGraspVecEnv(
            1,
            max_steps=max_steps,
            obs_type=obs_type,
            image_size=image_size,
            render_size=render_size,
            success_radius=success_radius,
            max_speed_at_grasp=max_speed_at_grasp,
            autoreset=False,
            **kwargs,
        )
        self.render_mode = render_mode
        self.observation_space = self._vec.single_observation_space
        self.action_space = self._vec.single_action_space
        self.metadata = {**self.metadata, "render_fps": int(round(self._vec.fps))}
        self.task = TASK_DESCRIPTION
        self.task_description = TASK_DESCRIPTION
        self._max_episode_steps = self._vec.max_steps
        self.obs_type = obs_type

    @property
    def vec(self) -> ReachGraspVecEnv:
        return self._vec

    @staticmethod
    def _first(obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v[0].copy() for k, v in obs.items()}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        opts = {k: v for k, v in (options or {}).items() if k != "reset_mask"}
        obs, _ = self._vec.reset(seed=seed, options=opts)
        return self._first(obs), {"is_success": False}

    def step(self, action):
        a = np.asarray(action, dtype=np.float64).reshape(1, -1)
        obs, reward, terminated, truncated, info = self._vec.step(a)
        return (
            self._first(obs),
            float(reward[0]),
            bool(terminated[0]),
            bool(truncated[0]),
            {"is_success": bool(info["is_success"][0])},
        )

    def render(self):
        return self._vec.render()[0]

    def get_state(self) -> dict[str, Any]:
        return self._vec.get_state()

    def set_state(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        return self._first(self._vec.set_state(state))


def register_gym_envs() -> None:
    """Register :data:`GYM_ID` with gymnasium (idempotent, imports nothing)."""
    if GYM_ID not in gym.registry:
        gym.register(id=GYM_ID, entry_point=f"{__name__}:ReachGraspEnv")


register_gym_envs()

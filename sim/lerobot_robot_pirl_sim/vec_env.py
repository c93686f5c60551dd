"""``PirlSimVecEnv``: the simulated robot's physics as a batched env for PI-RL rollouts (no rendering).

It follows the project's vector-env protocol (``lerobot_policy_pi_rl.envs``'s docstring; the same as
``ReachGraspVecEnv``): ``reset(seed=int | sequence | None, options={"reset_mask": ...})``
(and ``options={"starts": ...}``: explicit start states, e.g. to replay a recorded episode),
``step(actions, active=None)`` with same-step autoreset, ``info["final_obs"]``, ``info["done"]``,
``info["is_success"]``. It holds one ``MjData`` per env and steps them in a Python loop over the shared
``SimModel`` (one ``mj_step`` call of ``substeps`` steps per env and control step).

Observations are exactly what :class:`~lerobot_robot_pirl_sim.pirl_sim.PirlSim` reports (same units, see
:mod:`.physics`), so a policy trained on one runs on the other:

- ``agent_pos`` float32 [N, 5]: x.pos, y.pos, x.vel, y.vel, gripper.pos (-> ``observation.state``);
- ``environment_state`` float32 [N, 2]: cube.x, cube.y (-> ``observation.environment_state``).

Actions float32 [N, 3]: absolute targets x.pos, y.pos (m), gripper.pos (%), clipped to
``action_low`` / ``action_high``. Reward 1 on a successful grasp, else 0; terminated when the gripper
closes, truncated after ``max_steps`` steps.

Seeding as in ``ReachGraspVecEnv``: env ``i`` owns a ``np.random.Generator``; ``reset(seed=s)`` gives it
``default_rng(s + i)``, ``reset(seed=[s_0, ...])`` gives it ``default_rng(s_i)`` (equal seeds, identical
starts), ``seed=None`` continues the generators. Resets are the only consumers of randomness, so env ``i``
reset with seed ``s`` starts exactly where ``PirlSim.reset_scene(seed=s)`` puts the robot.

``obs_delay_ticks=k`` models the robot's decision delay: every observation it returns (``final_obs``
included) is the one from ``k`` control steps earlier (an episode's first observation until then), while
the physics, rewards and success are not delayed. The edge asks for the next chunk ``lead`` ticks before
the current one runs out, with the observation it read before sending the tick's action (edge/robot_loop.py),
so the chunk that runs next was decided from a state ``lead`` ticks old: a policy trained on the robot
with ``--control.lead_ticks=k`` is scored on the robot's own terms with ``obs_delay_ticks=k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from lerobot_robot_pirl_sim.physics import ENV_STATE_NAMES, STATE_NAMES, TASK_DESCRIPTION, SimModel, TaskParams

__all__ = ["DEFAULT_MAX_STEPS", "PirlSimVecEnv", "register"]

DEFAULT_MAX_STEPS = 60  # control steps (2.4 s at 25 Hz); a scripted episode takes about 25, the longest about 40
TASK_FIELDS = {f.name for f in fields(TaskParams)}


def _reset_targets(
    num_envs: int, seed: int | Sequence[int | None] | None, options: dict[str, Any] | None
) -> tuple[np.ndarray, list[int | None]]:
    """(mask of envs to reset, per-env seed or None) for ``reset(seed, options)`` (the protocol's semantics)."""
    mask = np.ones(num_envs, dtype=bool)
    if options and options.get("reset_mask") is not None:
        mask = np.asarray(options["reset_mask"], dtype=bool).reshape(-1)
        if mask.shape != (num_envs,):
            raise ValueError(f"reset_mask must have shape ({num_envs},), got {mask.shape}")
    if seed is None:
        return mask, [None] * num_envs
    if isinstance(seed, (int, np.integer)):
        return mask, [int(seed) + i for i in range(num_envs)]
    seeds = [None if s is None else int(s) for s in seed]
    if len(seeds) != num_envs:
        raise ValueError(f"got {len(seeds)} seeds for {num_envs} envs")
    return mask, seeds


def _starts(num_envs: int, options: dict[str, Any] | None) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per-env explicit start ``(ee [2], cube [2])`` from ``options["starts"]``, or None (draw one)."""
    given = (options or {}).get("starts")
    if given is None:
        return [None] * num_envs
    if len(given) != num_envs:
        raise ValueError(f"options['starts'] has {len(given)} entries for {num_envs} envs")
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for i, start in enumerate(given):
        if start is None:
            out.append(None)
            continue
        ee, cube = (np.asarray(x, dtype=np.float64).reshape(-1) for x in start)
        if ee.shape != (2,) or cube.shape != (2,):
            raise ValueError(f"options['starts'][{i}] must be (ee, cube), each an x, y pair; got {start!r}")
        out.append((ee.copy(), cube.copy()))
    return out


class PirlSimVecEnv:
    """``num_envs`` copies of the simulated robot's task, stepped in lock-step.

    Args:
        num_envs: batch size.
        autoreset: reset finished envs within the same ``step`` call (their terminal observation is in
            ``info["final_obs"]``). With ``False`` finished envs stay frozen until :meth:`reset`.
        seed: seed of the generators and of the initial reset (env ``i`` gets ``seed + i``).
        max_steps: control steps per episode before truncation.
        obs_type: only ``"state"`` (no rendering here; the robot has the cameras).
        obs_delay_ticks: observations are this many control steps old (see the module); 0: current.
        **task: :class:`~lerobot_robot_pirl_sim.physics.TaskParams` fields (``success_radius``,
            ``control_hz``, ...); the defaults are the robot's.
    """

    action_dim = 3
    state_dim = len(STATE_NAMES)
    env_state_dim = len(ENV_STATE_NAMES)

    def __init__(
        self,
        num_envs: int = 1,
        *,
        autoreset: bool = True,
        seed: int | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        obs_type: str = "state",
        obs_delay_ticks: int = 0,
        **task: Any,
    ):
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if int(obs_delay_ticks) < 0 or int(obs_delay_ticks) != obs_delay_ticks:
            raise ValueError(f"obs_delay_ticks must be an integer >= 0, got {obs_delay_ticks}")
        if obs_type != "state":
            raise ValueError(f"obs_type: PirlSimVecEnv has no cameras, only 'state' (got {obs_type!r})")
        unknown = set(task) - TASK_FIELDS
        if unknown:
            raise TypeError(f"unknown PirlSimVecEnv argument(s) {sorted(unknown)}; task fields: {sorted(TASK_FIELDS)}")
        self.num_envs = int(num_envs)
        self.max_steps = int(max_steps)
        self.autoreset = bool(autoreset)
        self.obs_type = obs_type
        self.params = TaskParams(**task)
        self.sim = SimModel(self.params)
        self.task = self.task_description = TASK_DESCRIPTION
        self.action_low = self.params.action_low.astype(np.float32)
        self.action_high = self.params.action_high.astype(np.float32)

        n = self.num_envs
        self._data = [self.sim.make_data() for _ in range(n)]
        self._obs = np.zeros((n, 7))  # float64 state of every env, the robot's observation order
        # the last obs_delay_ticks + 1 states of every env, oldest first: what a delayed observation reads
        self._past = np.zeros((int(obs_delay_ticks) + 1, n, 7))
        self._targets = np.zeros((n, 3))  # the targets each env's servos hold (NaN actions keep them)
        self._t = np.zeros(n, dtype=np.int64)
        self._done = np.zeros(n, dtype=bool)
        self._rngs = [np.random.default_rng(None if seed is None else int(seed) + i) for i in range(n)]
        self.reset()

    # ------------------------------------------------------------------ metadata
    @property
    def fps(self) -> float:
        return self.params.control_hz

    @property
    def single_observation_space(self):
        import gymnasium as gym

        return gym.spaces.Dict(
            {
                "agent_pos": gym.spaces.Box(-np.inf, np.inf, shape=(self.state_dim,), dtype=np.float32),
                "environment_state": gym.spaces.Box(-np.inf, np.inf, shape=(self.env_state_dim,), dtype=np.float32),
            }
        )

    @property
    def single_action_space(self):
        import gymnasium as gym

        return gym.spaces.Box(self.action_low, self.action_high, dtype=np.float32)

    # ------------------------------------------------------------------ core
    def _reset_one(self, i: int, start: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        ee, cube = self.sim.sample_start(self._rngs[i]) if start is None else start
        d = self._data[i]
        self.sim.reset(d, ee, cube)
        self.sim.observe(d, out=self._obs[i])
        self._past[:, i] = self._obs[i]  # an episode's first observation until k steps have run
        self._targets[i] = self.sim.targets(d)
        self._t[i] = 0
        self._done[i] = False

    def _observation(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        o = self._past[0] if rows is None else self._past[0][rows]  # _past[-1] is the current state
        return {
            "agent_pos": o[:, : self.state_dim].astype(np.float32),
            "environment_state": o[:, self.state_dim :].astype(np.float32),
        }

    def reset(
        self, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Reset envs (``options["reset_mask"]`` restricts it to some) and return ``(obs, info)``.

        ``options["starts"]``: one start state per env, ``(ee, cube)`` (the end effector's x, y and the cube's
        x, y, metres; as ``SimModel.sample_start`` draws them) or None to draw it as usual. An explicit start
        consumes no randomness, so it leaves the env's generator where it was."""
        mask, seeds = _reset_targets(self.num_envs, seed, options)
        starts = _starts(self.num_envs, options)
        for i in np.flatnonzero(mask):
            if seeds[i] is not None:
                self._rngs[i] = np.random.default_rng(seeds[i])
            self._reset_one(int(i), starts[i])
        return self._observation(), {"is_success": np.zeros(self.num_envs, dtype=bool)}

    def step(
        self, actions: np.ndarray, active: np.ndarray | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """One control step of every active env; frozen envs (``active[i] == False``, or finished without
        autoreset) keep their state, get reward 0 and are not done."""
        n = self.num_envs
        a = np.asarray(actions, dtype=np.float64)
        if a.shape != (n, self.action_dim):
            raise ValueError(f"actions must have shape ({n}, {self.action_dim}), got {a.shape}")
        if active is None:
            m = np.ones(n, dtype=bool)
        else:
            m = np.asarray(active, dtype=bool).reshape(-1).copy()
            if m.shape != (n,):
                raise ValueError(f"active must have shape ({n},), got {m.shape}")
        if not self.autoreset:
            m &= ~self._done
        targets = self.sim.clip_action(a, previous=self._targets)
        sim, obs = self.sim, self._obs
        for i in np.flatnonzero(m):
            d = self._data[i]
            sim.set_targets(d, targets[i])
            sim.step(d)
            sim.observe(d, out=obs[i])
        self._targets[m] = targets[m]
        self._t[m] += 1
        self._past[:-1, m] = self._past[1:, m]  # envs that stepped age their history by one step
        self._past[-1, m] = obs[m]

        closed, success = sim.judge(obs)
        terminated = m & closed
        success &= terminated
        truncated = m & ~closed & (self._t >= self.max_steps)
        done = terminated | truncated
        elapsed = self._t.copy()

        out = self._observation()
        final_obs = {k: v.copy() for k, v in out.items()}
        if self.autoreset:
            rows = np.flatnonzero(done)
            for i in rows:
                self._reset_one(int(i))
            if rows.size:
                fresh = self._observation(rows)
                for k in out:
                    out[k][rows] = fresh[k]
        else:
            self._done |= done
        info = {"final_obs": final_obs, "is_success": success, "done": done, "elapsed_steps": elapsed}
        return out, success.astype(np.float32), terminated, truncated, info

    def close(self) -> None:
        self._data = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_envs={self.num_envs}, max_steps={self.max_steps}, params={self.params})"


def register() -> bool:
    """Make ``lerobot_policy_pi_rl.envs.make_vec_env("pirl_sim", n, **kw)`` build a :class:`PirlSimVecEnv`
    (so ``run_pirl(..., LearnSettings(env="pirl_sim"))`` and the edge's simulated envs find it). A no-op
    returning False when the PI-RL plugin is not installed: this distribution does not depend on it."""
    try:
        from lerobot_policy_pi_rl.envs import register_vec_env
    except ImportError:
        return False
    register_vec_env("pirl_sim", PirlSimVecEnv)
    return True

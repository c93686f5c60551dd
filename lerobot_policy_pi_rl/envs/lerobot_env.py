"""Any LeRobot env type (``--env.type=...``) behind the project's vector-env protocol.

``LeRobotVecEnv(env_cfg, num_envs)`` builds the env exactly as ``lerobot-eval`` does: LeRobot's
``make_env`` (the config's own ``create_envs``: gymnasium ``SyncVectorEnv`` / ``AsyncVectorEnv`` with
same-step autoreset, or a multi-task suite) and the env's processors (``make_env_pre_post_processors``,
e.g. LIBERO's state processor), after ``register_third_party_plugins()`` so ``lerobot_env_*`` plugins work.
``VectorEnvAdapter`` (``vector_adapter.py``) turns the vector env into the protocol: finished envs held
still, success read from ``final_info``, per-env seeds.
"""

from __future__ import annotations

from lerobot_policy_pi_rl.envs.vector_adapter import VectorEnvAdapter

__all__ = ["LeRobotVecEnv"]


class LeRobotVecEnv(VectorEnvAdapter):
    """``num_envs`` envs of a LeRobot ``EnvConfig`` in the vec-env protocol.

    Args:
        env_cfg: a LeRobot ``EnvConfig`` (``--env.type=...``), e.g. ``make_env_config("pirl_reach")``.
        num_envs: number of envs.
        autoreset, success_key, seed: as ``VectorEnvAdapter``.
        use_async: run the envs in subprocesses (gymnasium's ``AsyncVectorEnv``): for envs whose step or
            construction is slow in Python.
    """

    def __init__(
        self,
        env_cfg,
        num_envs: int = 1,
        *,
        autoreset: bool = True,
        success_key: str = "is_success",
        use_async: bool = False,
        seed: int | None = None,
    ):
        from lerobot.envs.factory import make_env, make_env_pre_post_processors

        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.env_cfg = env_cfg
        if env_cfg.type == "metaworld":  # MetaWorld 3.0.0 fails to build its envs under MuJoCo 4 unpatched
            from lerobot_policy_pi_rl.envs.metaworld import patch_for_mujoco

            patch_for_mujoco()
        suites = make_env(env_cfg, n_envs=int(num_envs), use_async_envs=use_async)
        vec_envs = [env for tasks in suites.values() for env in tasks.values()]
        if len(vec_envs) != 1:
            for env in vec_envs:
                env.close()
            raise ValueError(
                f"env.type={env_cfg.type}: task {getattr(env_cfg, 'task', None)!r} gives {len(vec_envs)} tasks; "
                "PI-RL runs one task per env: give --env.task=<one task>"
            )
        task = getattr(env_cfg, "task", None)
        super().__init__(
            vec_envs[0],
            f"env.type={env_cfg.type}",
            autoreset=autoreset,
            success_key=success_key,
            hint="give the key the env uses (--control.success_key / --trainer.eval_success_key)",
            max_steps=getattr(env_cfg, "episode_length", None),
            task=None,
            processor=make_env_pre_post_processors(env_cfg, None)[0],
            seed=seed,
        )
        if self.task is None and isinstance(task, str):
            self.task = self.task_description = task

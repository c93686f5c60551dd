"""What the product's tools share: the SFT stage of the built-in task, success plots, and the tempered-SFT bar."""

from __future__ import annotations

import json
from pathlib import Path

# initial-noise stds a few-shot SFT policy is scored at (1: as trained; 0.05: the steering head's steer_std_min)
NOISE_STDS = (1.0, 0.5, 0.25, 0.05)


def success_by_noise_std(policy, evaluate) -> dict[str, float]:
    """``evaluate(policy)`` with the initial noise x_1 ~ N(0, std^2 I), for each std of NOISE_STDS: the bar a
    noise-steering method has to clear, since shrinking the noise alone (no learning) moves a few-shot flow policy
    toward its mode. ``policy`` was loaded with a fresh steering head (``noise_method=noise_steer``: mean 0); its
    std is overwritten."""
    import math

    import torch

    scores = {}
    for std in NOISE_STDS:
        with torch.no_grad():
            policy.steer_head.log_std.fill_(math.log(std))
        scores[str(std)] = evaluate(policy)
    return scores


def cpus() -> int:
    """CPUs this process may run on."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def run_report(command: str, runs: list[dict] | None = None) -> dict:
    """A benchmark's JSON head: the command, the date, the machine, then its runs (when it has several)."""
    import platform
    from datetime import UTC, datetime

    head = {
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {cpus()} CPUs, {platform.python_version()}".strip(),
    }
    return head if runs is None else {**head, "runs": runs}


def sft_checkpoint(
    out: Path,
    *,
    seed: int,
    num_demos: int,
    steps: int,
    noise_std: float,
    policy_overrides: dict | None = None,
    task: str = "pirl_reach",
) -> Path:
    """Record demos and behaviour-clone with LeRobot's train(); reuse a finished checkpoint.

    ``task``: 'pirl_reach' (the built-in task; a VLA backbone, ``policy_overrides["backbone"]``, gets demos
    with camera images) or 'sim' (the simulated robot's scripted expert, lerobot_robot_pirl_sim)."""
    from lerobot_policy_pi_rl.sft import REPO_ID, SFTSettings, record_demos, train_sft

    ckpt = out / "train" / "checkpoints" / "last" / "pretrained_model"
    if (ckpt / "model.safetensors").is_file():
        want = (policy_overrides or {}).get("backbone", "mlp")
        have = json.loads((ckpt / "config.json").read_text()).get("backbone", "mlp")
        if have != want:
            raise FileExistsError(
                f"{out} holds a finished SFT checkpoint of the '{have}' backbone, not '{want}': "
                "use another output directory"
            )
        print(f"[sft] reusing {ckpt}")
        return ckpt
    if (out / "train").exists():
        raise FileExistsError(f"{out / 'train'} exists but holds no finished checkpoint; delete it and rerun")
    repo_id = REPO_ID
    if task == "sim":
        from lerobot_robot_pirl_sim import demos as sim_demos

        repo_id = sim_demos.REPO_ID
    if not (out / "data" / "meta" / "info.json").is_file():
        print(f"[sft] recording {num_demos} scripted demonstrations (seed {seed}) -> {out / 'data'}")
        if task == "sim":
            from lerobot_robot_pirl_sim import record_demos as record_sim_demos

            record_sim_demos(out / "data", num_demos, seed=seed, noise_std=noise_std)
        else:
            images = (policy_overrides or {}).get("backbone", "mlp") != "mlp"
            obs_type = "pixels_agent_pos" if images else "state"
            record_demos(out / "data", num_demos, seed=seed, noise_std=noise_std, obs_type=obs_type)
    print(f"[sft] behaviour cloning pi_rl with lerobot's train() for {steps} steps -> {out / 'train'}")
    settings = SFTSettings(steps=steps, seed=seed, policy_overrides=policy_overrides or {})
    return train_sft(out / "data", out / "train", settings, repo_id=repo_id)


def env_sft_checkpoint(
    out: Path,
    target,
    env_kwargs: dict,
    field: str,
    *,
    expert: str | None,
    num_demos: int,
    steps: int,
    seed: int,
    noise_std: float,
    fps: int = 50,
    repo_id: str = "local/pirl_demos",
    dataset_root: Path | None = None,
    policy_overrides: dict | None = None,
    start_states: int = 0,
) -> Path:
    """SFT on any env: ``expert`` (``module:callable``) records ``num_demos`` successful episodes of ``target`` (a
    LeRobot ``EnvConfig`` or a name ``make_vec_env`` takes, built with ``env_kwargs``) into OUT/data, unless a
    dataset is there or ``dataset_root`` is given; then LeRobot's train() behaviour-clones ``pi_rl`` into OUT/train.
    A finished checkpoint is reused. ``field`` names the env in errors (``env.type=...``, ``sim_env=...``). With
    ``start_states`` > 0 a recorded dataset's state statistics are widened to cover that many env start states
    (``demos.record_env_demos``)."""
    from lerobot_policy_pi_rl.demos import load_expert, record_env_demos
    from lerobot_policy_pi_rl.envs import open_sim_env
    from lerobot_policy_pi_rl.sft import SFTSettings, train_sft

    data = Path(dataset_root or out / "data")
    if dataset_root is None and not (data / "meta" / "info.json").is_file():
        if expert is None:
            raise ValueError("expert: recording demonstrations needs a scripted expert (module:callable)")
        expert_fn = load_expert(expert)
        env = open_sim_env(target, min(num_demos, 8), field, autoreset=False, **env_kwargs)
        print(f"[sft] recording {num_demos} demonstrations of {field} with {expert} -> {data}")
        try:
            record_env_demos(
                data,
                env,
                expert_fn,
                num_demos,
                repo_id=repo_id,
                seed=seed,
                noise_std=noise_std,
                fps=fps,
                start_states=start_states,
            )
        finally:
            env.close()
    elif dataset_root is None:
        _check_recorded_start_states(data, start_states)
    ckpt = out / "train" / "checkpoints" / "last" / "pretrained_model"
    if (ckpt / "model.safetensors").is_file():
        print(f"[sft] reusing {ckpt}")
        return ckpt
    print(f"[sft] behaviour cloning on {data} ({steps} steps)")
    settings = SFTSettings(steps=steps, seed=seed, policy_overrides=policy_overrides or {})
    return train_sft(data, out / "train", settings, repo_id)


def _check_recorded_start_states(data: Path, start_states: int) -> None:
    """A dataset recorded earlier in OUT is reused only with the start-state widening it was recorded with."""
    provenance = data / "meta" / "pirl_start_states.json"
    had = json.loads(provenance.read_text())["start_states"] if provenance.is_file() else 0
    if had != start_states:
        raise ValueError(
            f"start_states: the demos in {data} were recorded with start_states={had}, not {start_states}; give a "
            "new --out or the same setting"
        )


def plot_curves(
    path: Path, runs: list[dict], title: str, xlabel: str = "environment steps", target: float = 0.9
) -> None:
    """Deterministic success against ``xlabel`` (each run's ``curve``: (x, success) pairs), one line per run, one
    colour (and line style) per label, a dashed line at ``target``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2) if len(runs) <= 6 else (9.5, 4.2))
    styles: dict[str, tuple[str, str]] = {}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    for run in runs:
        label = run["label"]
        n = len(styles)  # past eight labels the colours repeat with another line style
        colour, ls = styles.setdefault(label, (palette[n % len(palette)], ("-", "--", ":")[n // len(palette) % 3]))
        xs, ys = zip(*run["curve"], strict=True)
        ax.plot(
            xs,
            ys,
            color=colour,
            ls=ls,
            alpha=0.8,
            label=label if label not in ax.get_legend_handles_labels()[1] else None,
        )
    ax.axhline(target, color="k", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("deterministic success")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    if len(styles) <= 6:
        ax.legend(loc="lower right")
    else:  # many lines: the legend beside the axes, not over the curves
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_policy_choice(backbone: str, size: str | None, smolvlm_config: str) -> None:
    """The policy fields the benchmarks share (--backbone, --size, --smolvlm_config): a ValueError naming the
    field for a value out of its choices."""
    from lerobot_policy_pi_rl.presets import BACKBONE_CHOICES

    if backbone not in BACKBONE_CHOICES:
        raise ValueError(f"backbone: must be one of {BACKBONE_CHOICES} (got {backbone!r})")
    if size not in (None, "full", "reduced"):
        raise ValueError(f"size: must be full or reduced (got {size!r})")
    if smolvlm_config not in ("hub", "offline"):
        raise ValueError(f"smolvlm_config: must be hub or offline (got {smolvlm_config!r})")

"""Shared CLI plumbing: clean error reporting, the SFT stage, plots."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lerobot_policy_pi_rl.algorithm import PiRLAlgorithmConfig

USER_ERRORS = (ValueError, KeyError, FileExistsError, FileNotFoundError, NotADirectoryError)


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main``; a user mistake prints one clear line (no traceback) and exits 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # LeRobot probes torchcodec (video decoding) at import and logs a multi-page traceback when its
    # FFmpeg libraries are missing; our datasets store images, so its pyav fallback is fine: quiet it.
    logging.getLogger("lerobot.utils.import_utils").setLevel(logging.ERROR)
    try:
        sys.exit(main() or 0)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def builtin_task_algorithm_config(**overrides) -> PiRLAlgorithmConfig:
    """PI-RL hyperparameters for the small MLP backbone on the built-in task.

    The paper's actor lr (5e-6) is for a 300 M-parameter action expert; the 0.4 M-parameter MLP
    needs a larger one (3e-5 keeps the clip fraction around 0.1), its critic reads frozen prefix
    features and learns faster at 1e-3, and 2 epochs x 4 minibatches (8 optimizer steps per
    update) stays stable with 256 episodes per update, and weight decay is off (0.01 in the paper
    pulls the small MLP's SFT weights toward zero). Everything else is the paper's default.
    See BENCHMARKS.md for the runs that chose these.
    """
    defaults = dict(actor_lr=3e-5, critic_lr=1e-3, update_epochs=2, num_minibatches=4, weight_decay=0.0)
    defaults.update(overrides)
    return PiRLAlgorithmConfig(**defaults)


BACKBONE_CHOICES = ("mlp", "pi0", "pi05", "smolvla")


def builtin_policy_overrides(backbone: str) -> dict:
    """pi_rl config fields for the built-in task. The MLP reads the state; a VLA backbone runs
    LeRobot's real modeling code at the reduced CPU size (``backbones/reduced.py``) and reads what a
    VLA reads: the rendered camera image, the state and the task instruction (16 tokens)."""
    if backbone == "mlp":
        return {}
    if backbone not in BACKBONE_CHOICES:
        raise ValueError(f"--backbone must be one of {BACKBONE_CHOICES}, got {backbone!r}")
    return {"backbone": backbone, "backbone_reduced": {}, "backbone_config": {"tokenizer_max_length": 16}}


def sft_checkpoint(out: Path, *, seed: int, num_demos: int, steps: int, noise_std: float,
                   policy_overrides: dict | None = None) -> Path:
    """Record demos and behaviour-clone with LeRobot's train(); reuse a finished checkpoint.

    A VLA backbone (``policy_overrides["backbone"]``) gets demos with camera images."""
    from lerobot_policy_pi_rl.sft import SFTSettings, record_demos, train_sft

    ckpt = out / "train" / "checkpoints" / "last" / "pretrained_model"
    if (ckpt / "model.safetensors").is_file():
        want = (policy_overrides or {}).get("backbone", "mlp")
        have = json.loads((ckpt / "config.json").read_text()).get("backbone", "mlp")
        if have != want:
            raise FileExistsError(f"{out} holds a finished SFT checkpoint of the '{have}' backbone, not '{want}': "
                                  "use another output directory")
        print(f"[sft] reusing {ckpt}")
        return ckpt
    if (out / "train").exists():
        raise FileExistsError(f"{out / 'train'} exists but holds no finished checkpoint; delete it and rerun")
    if not (out / "data" / "meta" / "info.json").is_file():
        print(f"[sft] recording {num_demos} scripted demonstrations (seed {seed}) -> {out / 'data'}")
        images = (policy_overrides or {}).get("backbone", "mlp") != "mlp"
        record_demos(out / "data", num_demos, seed=seed, noise_std=noise_std,
                     obs_type="pixels_agent_pos" if images else "state")
    print(f"[sft] behaviour cloning pi_rl with lerobot's train() for {steps} steps -> {out / 'train'}")
    settings = SFTSettings(steps=steps, seed=seed, policy_overrides=policy_overrides or {})
    return train_sft(out / "data", out / "train", settings)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def plot_curves(path: Path, runs: list[dict], title: str) -> None:
    """Deterministic success vs env steps, one line per run, one colour per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours: dict[str, str] = {}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    for run in runs:
        label = run["label"]
        colour = colours.setdefault(label, palette[len(colours) % len(palette)])
        xs, ys = zip(*run["curve"], strict=True)
        ax.plot(xs, ys, color=colour, alpha=0.8, label=label if label not in ax.get_legend_handles_labels()[1] else None)
    ax.axhline(0.9, color="k", lw=0.8, ls="--")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("deterministic success")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

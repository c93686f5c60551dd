"""pirl-bench gpu: real-size pi0 / pi0.5 / SmolVLA on one GPU, in one command that fits a time budget.

    python -m pirl_tools.gpu_check --out=DIR [--time_budget_s=420] [--backbones='[pi0,pi05,smolvla]']
                                   [--iterations=30] [--batch=32] [--dry=true]
    (or pirl-bench gpu ...; `make gpu-check` runs it on a bare box: docs/gpu_check.md)

For a bare GPU box with no network and only PyTorch (plus the wheelhouse of `make gpu-wheels`). Per backbone
(randomly initialised, LeRobot's real modeling code at the released size, bf16 as LeRobot loads it; built by
``pirl_tools.bench._vla_policy``, the code of ``pirl-bench infer``): parameters, then one chunk's latency (one
``sample_chains`` call, host numpy in and out, batch 1) p50 / p90 for PyTorch eager on CUDA, the sampler replayed
as a CUDA graph, and torch.compile (last, only while the budget allows; ``helps`` says whether it beat eager).
For pi0's action expert: the PPO update (``PiRLAlgorithm.update_on``, one optimizer step on ``batch`` chunks)
time and ``torch.cuda.max_memory_allocated``. Also the machine and a bf16 matmul / memory-copy roofline.

Every part is timed against ``time_budget_s``: a part that does not fit what is left is listed under
``skipped`` with the reason, and one that fails is listed under ``failed`` with its error while the rest
still runs. ``--dry=true``: reduced sizes and a few iterations (the CPU dry mode the tests run; on a GPU box a
quick rehearsal of every CUDA path). Writes DIR/gpu_check.json after every part.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import platform
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

from pirl.cli import require, write_json

BACKBONES = ("pi0", "pi05", "smolvla")
EAGER, GRAPH, COMPILE = "torch_eager_cuda", "torch_cuda_graph", "torch_compile_cuda"
NO_CUDA = "no CUDA (torch.cuda.is_available() is False)"
# what importing the check's code paths needs besides torch (measured in a venv holding only torch: LeRobot 0.6.1
# imports OpenCV for GR00T's processor, and `datasets` / PyAV / pyarrow / pandas via lerobot.rl -> lerobot.datasets,
# although the check runs none of that code); module -> distribution
REQUIRED_MODULES = {
    "numpy": "numpy",
    "torchvision": "torchvision",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface_hub",
    "lerobot": "lerobot",
    "draccus": "draccus",
    "gymnasium": "gymnasium",
    "datasets": "datasets",
    "pandas": "pandas",
    "pyarrow": "pyarrow",
    "av": "av",
    "cv2": "opencv-python-headless",
    "PIL": "pillow",
    "einops": "einops",
    "num2words": "num2words",
}
# seconds a part needs at least before it is started (estimates for a full-size VLA on an H100-class box; the
# dry mode's reduced models need a fraction of a second): a part that does not fit what is left is skipped
RESERVE_S = {"roofline": 10, "build": 45, "eager": 10, "graph": 20, "ppo": 60, "compile": 150}
DRY_RESERVE_S = dict.fromkeys(RESERVE_S, 0.5)


@dataclass
class GpuCheckConfig:
    """pirl-bench gpu: one-chunk latency of real-size pi0 / pi0.5 / SmolVLA (eager, CUDA graph, torch.compile)
    and pi0's PPO update time and peak memory, inside a time budget; writes OUT/gpu_check.json."""

    # output directory (required)
    out: str | None = None
    # CPU dry mode: reduced-size VLAs and a few iterations (what the tests run; on a GPU box, a quick rehearsal)
    dry: bool = False
    # the whole check's budget in seconds: a part that does not fit what is left is skipped (listed with why)
    time_budget_s: float = 420.0
    # VLA backbones to time, in this order (pi0, pi05, smolvla)
    backbones: list[str] = field(default_factory=lambda: list(BACKBONES))
    # timed chunk inferences per mode (default 30; dry 3)
    iterations: int | None = None
    # untimed calls per mode before timing (default 3; dry 1)
    warmup: int | None = None
    # chunks in pi0's PPO update (one optimizer step on all of them; default 32; dry 4)
    batch: int | None = None
    # timed PPO updates after one untimed (default 3; dry 1)
    ppo_updates: int | None = None
    # also time torch.compile (after everything else, while the budget lasts)
    compile: bool = True
    # torch.compile mode
    compile_mode: str = "default"
    # denoise steps K per chunk (10: the public pi0 / pi0.5 anchors)
    num_denoise_steps: int = 10
    # camera images per decision (default 3 at full size, as LIBERO's pi0; 1 dry)
    cameras: int | None = None
    # seed of the random weights and inputs
    seed: int = 0

    def __post_init__(self):
        if not self.out:
            raise ValueError("out: required (the output directory)")
        require(self, above={"time_budget_s": 0}, at_least={"num_denoise_steps": 1, "warmup": 0})
        require(self, at_least={"iterations": 1, "batch": 1, "ppo_updates": 1, "cameras": 1})
        unknown = [b for b in self.backbones if b not in BACKBONES]
        if unknown or not self.backbones:
            raise ValueError(f"backbones: each must be one of {', '.join(BACKBONES)} (got {self.backbones})")
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"compile_mode: a torch.compile mode (got {self.compile_mode!r})")

    def resolved(self) -> dict:
        """The iteration counts and sizes after the dry / full defaults."""
        dry = self.dry
        return {
            "iterations": self.iterations or (3 if dry else 30),
            "warmup": self.warmup if self.warmup is not None else (1 if dry else 3),
            "batch": self.batch or (4 if dry else 32),
            "ppo_updates": self.ppo_updates or (1 if dry else 3),
            "cameras": self.cameras or (1 if dry else 3),
            "size": "reduced" if dry else "full",
        }


class Budget:
    """Wall-clock budget of the check: what is left, and whether a part fits it."""

    def __init__(self, seconds: float, reserve: dict):
        self.start, self.seconds, self.reserve = time.monotonic(), seconds, reserve

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def why_not(self, part: str) -> str | None:
        """None when ``part`` fits what is left, else the skip reason."""
        left, need = self.left(), self.reserve[part]
        if left < need:
            return f"time budget: {max(left, 0):.1f}s of {self.seconds:.0f}s left, this part needs ~{need:g}s"
        return None


def missing_modules() -> dict[str, str]:
    """REQUIRED_MODULES that this interpreter cannot import: module -> distribution."""
    return {m: d for m, d in REQUIRED_MODULES.items() if importlib.util.find_spec(m) is None}


def machine() -> dict:
    """The box: GPU, driver / CUDA, torch, CPU, memory, host (each field best effort)."""
    import torch

    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        info["memory_gib"] = round(int(kb.split()[1]) / 2**20, 1)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            compute_capability=f"{p.major}.{p.minor}",
            multiprocessors=p.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
        try:
            q = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,power.limit,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
            info["nvidia_smi"] = q.stdout.strip().splitlines()[0]  # driver, power limit, max SM clock
        except (OSError, subprocess.SubprocessError, IndexError) as e:
            info["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    return info


def _error(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def _stats(ms: list[float]) -> dict:
    import numpy as np

    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "min_ms": round(float(min(ms)), 3),
        "n": len(ms),
    }


def _time_calls(fn, iterations: int, warmup: int, cap_s: float) -> dict:
    """Latency of ``fn`` (which returns host arrays, so it has synchronised): ``warmup`` untimed calls,
    then up to ``iterations`` timed ones, fewer if ``cap_s`` seconds run out (``n`` says how many)."""
    for _ in range(warmup):
        fn()
    ms, stop = [], time.monotonic() + cap_s
    gc.collect()
    gc.disable()  # a collection inside one call would land in that call's figure
    try:
        for _ in range(iterations):
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
            if time.monotonic() > stop:
                break
    finally:
        gc.enable()
    return _stats(ms)


def _in_thread(fn, timeout_s: float):
    """(finished, result, exception) of ``fn()`` run in a daemon thread for at most ``timeout_s``: a
    torch.compile that overruns the budget cannot be interrupted, but the check can stop waiting for it."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(max(timeout_s, 0.0))
    return not t.is_alive(), box.get("result"), box.get("error")


def roofline(device: str) -> dict:
    """What the GPU does at best: a dense bf16 matmul (TFLOP/s) and a device-to-device copy (GB/s read + write),
    the two bounds of a chunk's latency (the physical floor of the issue's anchors)."""
    import torch

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    src = torch.empty(2**28, device=device, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)

    def best(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return min(times)

    t_mm = best(lambda: a @ b)
    t_copy = best(lambda: dst.copy_(src))
    out = {
        "bf16_matmul_tflops": round(2 * n**3 / t_mm / 1e12, 1),
        "matmul_shape": [n, n, n],
        "copy_gbps": round(2 * src.numel() * 4 / t_copy / 1e9, 1),
        "copy_bytes": src.numel() * 4,
    }
    return out  # the operands are freed on return (the caller empties the cache)


def _build(name: str, cfg: GpuCheckConfig, r: dict, device: str):
    """(policy, description): bench.py's randomly initialised VLA on ``device`` in bf16. SmolVLA has no dtype
    field: LeRobot's from_pretrained loads its VLM in bf16 (the expert stays float32), so the VLM is cast so.
    Weights are initialised on ``device``; should that fail, the policy is built on the CPU and moved (slower:
    minutes for 3.5 B parameters), and the description says so."""
    import torch

    from pirl_tools.bench import _vla_policy

    args = SimpleNamespace(
        backbone=name,
        size=r["size"],
        cameras=r["cameras"],
        seed=cfg.seed,
        num_denoise_steps=cfg.num_denoise_steps,
        smolvlm_config="offline",  # no network on the box
    )
    try:
        policy, source = _vla_policy(args, device=device, dtype="bfloat16")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - a module that cannot be created on the GPU directly
        if device == "cpu":
            raise
        gc.collect()
        torch.cuda.empty_cache()  # what the failed build left on the GPU
        policy, source = _vla_policy(args, device="cpu", dtype="bfloat16")
        source += f"; built on the CPU and moved ({_error(e)} when built on {device})"
    if name == "smolvla":
        policy.backbone.base.model.vlm_with_expert.vlm.to(torch.bfloat16)
    return policy.to(device).eval(), source


def _dtypes(params) -> dict[str, int]:
    """Parameter count per dtype."""
    counts: dict[str, int] = {}
    for p in params:
        key = str(p.dtype).removeprefix("torch.")
        counts[key] = counts.get(key, 0) + p.numel()
    return counts


def ppo_update(policy, batch: int, updates: int, seed: int, device: str, noise_method: str) -> dict:
    """pi0's PPO update at ``batch`` chunks: one on-policy RolloutBatch (1 macro-step x ``batch`` envs, sampled
    by the policy itself, random rewards) and ``PiRLAlgorithm.update_on`` with one epoch of one minibatch, so one
    update = the frozen prefix computed once (the paper's frozen VLM) + one optimizer step (re-evaluation of the
    K denoise steps through the action expert with gradients, backward, clipping, AdamW). The first update
    allocates the optimizer state and is reported apart."""
    import numpy as np
    import torch

    from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm, PiRLAlgorithmConfig
    from lerobot_policy_pi_rl.rollout import RolloutBatch
    from pirl.export.onnx_export import example_observations

    cuda = device == "cuda"
    g = torch.Generator().manual_seed(seed)
    obs = {k: v.to(device) for k, v in example_observations(policy, batch, g).items()}
    initial, steps, stochastic = policy.draw_noise(batch, generator=g, device="cpu")
    with torch.no_grad():
        s = policy.sample_chains(
            obs, initial.to(device), steps.to(device), stochastic.to(device), noise_method=noise_method
        )
    rewards = torch.randn(1, batch, generator=g)
    ones = torch.ones(1, batch, dtype=torch.bool)
    rollouts = RolloutBatch(
        observations={k: v.unsqueeze(0) for k, v in obs.items()},
        chains=s.chain.chain.unsqueeze(0),
        stochastic=s.chain.stochastic.unsqueeze(0),
        noise_level=s.noise_level.unsqueeze(0),
        log_probs=s.chain.log_prob.unsqueeze(0),
        values=s.value.unsqueeze(0),
        rewards=rewards,
        terminated=ones,
        truncated=~ones,
        valid=ones,
        bootstrap_values=torch.zeros(1, batch),
        episode_returns=rewards[0],
        episode_success=rewards[0] > 0,
        group_ids=torch.arange(batch),
    )
    del s
    algo = PiRLAlgorithm(policy, PiRLAlgorithmConfig(update_epochs=1, num_minibatches=1))
    actor = sum(p.numel() for p in policy.rl_actor_parameters())
    critic = sum(p.numel() for p in policy.rl_critic_parameters())

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with torch.no_grad():  # the frozen prefix alone, to split it out of the update's time
        sync()
        t0 = time.perf_counter()
        policy.backbone.embed_prefix(obs)
        sync()
        prefix_ms = (time.perf_counter() - t0) * 1e3
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times, stats = [], None
    try:
        for _ in range(updates + 1):
            sync()
            t0 = time.perf_counter()
            stats = algo.update_on(rollouts)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        policy.eval()  # an update that raised (out of memory) leaves it in train mode; the compile pass follows
    out = {
        "batch_chunks": batch,
        "samples_per_update": int(stats.extra.get("samples", 0)),
        "optimizer_steps_per_update": int(stats.extra.get("optimizer_steps", 0)),
        "first_update_ms": round(times[0], 1),
        "update_ms_p50": round(float(np.median(times[1:])), 1),
        "updates_timed": len(times) - 1,
        "prefix_forward_ms": round(prefix_ms, 1),
        "trained_parameters": {"actor": actor, "critic": critic},
        "trained_dtypes": _dtypes(policy.rl_actor_parameters()),
        "loss_finite": bool(all(np.isfinite(v) for v in stats.losses.values())),
    }
    if cuda:
        out.update(
            peak_memory_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
            memory_allocated_before_gib=round(before / 2**30, 2),
            peak_memory_note="torch.cuda.max_memory_allocated over the timed updates (weights, activations, "
            "gradients, AdamW state); memory_allocated_before: the weights and the rollout batch alone",
        )
    del algo, rollouts
    return out


def run(cfg: GpuCheckConfig, command: str) -> int:
    out = Path(cfg.out)
    r = cfg.resolved()
    report: dict = {
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "dry": cfg.dry,
        "settings": {**asdict(cfg), **r},
        "machine": {},
        "preflight": {},
        "roofline": None,
        "backbones": {},
        "ppo": None,
        "skipped": {},
        "failed": {},
        "notes": {
            "latency": "one chunk = one sample_chains call (prefix + K denoise steps + log-prob + value), batch 1, "
            "host numpy in and out (the copies included), as pirl-bench infer measures it",
            "weights": "random init (no weights needed to time the released architectures); bf16 as LeRobot loads "
            "them (pi0 / pi0.5: dtype=bfloat16, vision tower and norms float32; SmolVLA: VLM bf16, expert float32)",
            "compile_helps": "torch.compile's p50 below eager's p50 on the same inputs",
            "unverified": "TensorRT (FP8 / FP16 engines) and Jetson Thor: not part of this check (no TensorRT in "
            "a 64 MiB wheelhouse); see docs/gpu_check.md",
        },
    }
    budget = Budget(cfg.time_budget_s, DRY_RESERVE_S if cfg.dry else RESERVE_S)

    def save():
        report["elapsed_s"] = round(time.monotonic() - budget.start, 1)
        write_json(out / "gpu_check.json", report)

    def attempt(part: str, fn, reserve: str):
        """fn() if the budget allows; a skip or a failure is recorded under ``part`` and None returned."""
        why = budget.why_not(reserve)
        if why:
            report["skipped"][part] = why
            print(f"[gpu] skip {part}: {why}")
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a bare box must give as much as it can: record, go on
            report["failed"][part] = _error(e)
            print(f"[gpu] {part} failed: {report['failed'][part]}")
            return None
        finally:
            save()

    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    try:
        report["machine"] = machine()
    except Exception as e:  # noqa: BLE001
        report["failed"]["machine"] = _error(e)
    report["preflight"] = {"missing_modules": missing_modules(), "device": device}
    save()
    print(f"[gpu] {report['machine'].get('gpu', 'no GPU')}; torch {torch.__version__}; budget {cfg.time_budget_s:g}s")
    if not cuda and not cfg.dry:
        # full-size VLAs on the CPU would spend the whole budget on one backbone: say what to run instead
        for name in cfg.backbones:
            report["skipped"][name] = f"{NO_CUDA}; --dry=true runs the CPU dry mode"
        report["skipped"]["ppo"] = NO_CUDA
        save()
        print(f"[gpu] {NO_CUDA}: nothing to measure at full size; --dry=true runs the CPU dry mode")
        print(f"wrote {out / 'gpu_check.json'}")
        return 1
    missing = report["preflight"]["missing_modules"]
    blocked = None  # why the LeRobot parts cannot run (they import all of REQUIRED_MODULES), or None
    if missing:
        blocked = "missing modules (install their wheels): " + ", ".join(f"{m} ({d})" for m, d in missing.items())
        print(f"[gpu] {blocked}")

    if cuda:
        report["roofline"] = attempt("roofline", lambda: roofline(device), "roofline")
        torch.cuda.empty_cache()
    else:
        report["skipped"]["roofline"] = NO_CUDA

    cap = 5.0 if cfg.dry else 30.0  # seconds of timed calls per mode at most
    kept: dict = {}  # backbone -> (policy, inputs, noise method), for the torch.compile pass at the end
    for name in cfg.backbones:
        entry: dict = {"latency": {}}

        def build(name=name, entry=entry):
            started = time.monotonic()
            held = torch.cuda.memory_allocated() if cuda else 0  # the backbones built before this one
            policy, source = _build(name, cfg, r, device)
            if cuda:
                torch.cuda.synchronize()
            entry.update(
                source=source,
                build_s=round(time.monotonic() - started, 1),
                parameters=sum(p.numel() for p in policy.parameters()),
                parameters_by_dtype=_dtypes(policy.parameters()),
                num_denoise_steps=policy.config.num_denoise_steps,
                chunk_size=policy.config.chunk_size,
            )
            if cuda:
                entry["weights_gib"] = round((torch.cuda.memory_allocated() - held) / 2**30, 2)
            return policy

        report["backbones"][name] = entry
        if blocked:  # a half-imported LeRobot would fail part by part, or worse, half work: say why once
            report["skipped"][name] = blocked
            continue
        policy = attempt(f"{name}/build", build, "build")
        if policy is None:
            continue
        from pirl_tools.bench import _infer_inputs, _torch_backend, _torch_cuda_graph_backend

        noise_method = policy.config.noise_method
        inp = attempt(f"{name}/inputs", lambda p=policy: _infer_inputs(p, 1, cfg.seed), "eager")
        if inp is None:
            continue
        if cuda:
            eager = _torch_backend(policy, inp, noise_method, "cuda")
            entry["latency"][EAGER] = attempt(
                f"{name}/{EAGER}", lambda e=eager: _time_calls(e, r["iterations"], r["warmup"], cap), "eager"
            )

            def graph(policy=policy, inp=inp, noise_method=noise_method):
                t0 = time.monotonic()
                fn = _torch_cuda_graph_backend(policy, inp, noise_method)
                capture_s = time.monotonic() - t0
                return {**_time_calls(fn, r["iterations"], r["warmup"], cap), "capture_s": round(capture_s, 1)}

            entry["latency"][GRAPH] = attempt(f"{name}/{GRAPH}", graph, "graph")
        else:
            # the dry mode on a CPU: the same sampler path, eager on the CPU; the CUDA parts say why they are absent
            eager = _torch_backend(policy, inp, noise_method, "cpu")
            entry["latency"]["torch_eager_cpu"] = attempt(
                f"{name}/torch_eager_cpu", lambda e=eager: _time_calls(e, r["iterations"], r["warmup"], cap), "eager"
            )
            for mode in (EAGER, GRAPH, COMPILE):
                report["skipped"][f"{name}/{mode}"] = NO_CUDA
        entry["latency"] = {k: v for k, v in entry["latency"].items() if v is not None}
        if name == "pi0":
            report["ppo"] = attempt(
                "pi0/ppo_update",
                lambda p=policy, nm=noise_method: ppo_update(p, r["batch"], r["ppo_updates"], cfg.seed, device, nm),
                "ppo",
            )
            if not cuda:
                report["skipped"]["pi0/ppo_peak_memory"] = NO_CUDA
        kept[name] = (policy, inp, noise_method)
        save()
    if "pi0" not in cfg.backbones:
        report["skipped"]["pi0/ppo_update"] = "pi0 not in backbones"
    elif blocked:
        report["skipped"]["pi0/ppo_update"] = blocked

    abandoned = False  # a torch.compile still running in its thread after its time ran out
    for name, (policy, inp, noise_method) in kept.items():
        part = f"{name}/{COMPILE}"
        if not cuda or not cfg.compile:
            report["skipped"].setdefault(part, NO_CUDA if not cuda else "compile=false")
            continue
        if abandoned:
            report["skipped"][part] = "time budget: an earlier torch.compile overran it"
            continue
        why = budget.why_not("compile")
        if why:
            report["skipped"][part] = why
            continue
        from pirl_tools.bench import _compile_backend

        def first_call(policy=policy, inp=inp, noise_method=noise_method):
            t0 = time.monotonic()
            fn = _compile_backend(policy, inp, noise_method, cfg.compile_mode)
            fn()  # compiles
            return fn, time.monotonic() - t0

        limit = budget.left() - 15  # the timing after it, and the JSON
        finished, result, error = _in_thread(first_call, limit)
        if not finished:
            abandoned = True
            report["failed"][part] = f"torch.compile did not finish within the {limit:.0f}s left of the budget"
        elif error is not None:
            report["failed"][part] = _error(error)
        else:
            fn, compile_s = result
            stats = attempt(part, lambda fn=fn: _time_calls(fn, r["iterations"], r["warmup"], 15.0), "eager")
            if stats is not None:
                eager_p50 = report["backbones"][name]["latency"].get(EAGER, {}).get("p50_ms")
                stats.update(compile_s=round(compile_s, 1), mode=cfg.compile_mode)
                stats["helps"] = eager_p50 is not None and stats["p50_ms"] < eager_p50
                report["backbones"][name]["latency"][COMPILE] = stats
        save()

    save()
    _print_summary(report)
    print(f"wrote {out / 'gpu_check.json'} ({report['elapsed_s']:.0f}s)")
    if abandoned:  # the compile thread cannot be joined: leave without waiting for it
        import sys

        sys.stdout.flush()
        os._exit(0)
    return 0


# --- the wheelhouse a bare box needs (`make gpu-wheels`) -----------------------------------------------------------

# distributions the check imports besides torch / torchvision and torch's own dependencies, measured by running
# the dry mode in a venv that held only torch (docs/gpu_check.md); the LeRobot stack is pinned to this machine's
# versions, the rest only fills what the box lacks (pip keeps an installed version)
PINNED = ("lerobot", "transformers", "tokenizers", "huggingface_hub", "safetensors", "draccus")
WHEELHOUSE = (
    *PINNED,
    "numpy",
    "httpx",
    "httpcore",
    "h11",
    "idna",
    "certifi",
    "requests",
    "urllib3",
    "mergedeep",
    "toml",
    "typing-inspect",
    "mypy-extensions",
    "pyyaml",
    "regex",
    "tqdm",
    "packaging",
    "gymnasium",
    "einops",
    "datasets",
    "multiprocess",
    "dill",
    "xxhash",
    "pandas",
    "python-dateutil",
    "pytz",
    "pillow",
    "num2words",
    "opencv-python-headless",
    "pyarrow",
    "av",
)
# imported at LeRobot 0.6.1's import time but never run by the check, and too big for the 64 MiB carry (OpenCV ~58
# MiB, pyarrow ~52 MiB, PyAV ~38 MiB for CPython 3.12 x86_64): left out unless asked for; the box must have them
HEAVY = ("opencv-python-headless", "pyarrow", "av")


@dataclass
class GpuWheelsConfig:
    """python -m pirl_tools.gpu_check wheels: download the wheels a bare PyTorch box needs for the check into
    DEST (no dependencies resolved: the list is the measured import closure), print their sizes, and fail when the
    total is over max_mib."""

    # wheelhouse directory (created; wheels already there are counted too)
    dest: str = "wheels/gpu-check"
    # the carry limit, MiB
    max_mib: float = 64.0
    # distributions to leave out (the box has them); default: the three that do not fit
    leave_out: list[str] = field(default_factory=lambda: list(HEAVY))
    # the box's Python as X.Y (default: this interpreter's)
    python_version: str | None = None
    # the box's wheel platform tags, e.g. '[manylinux_2_28_aarch64]' for a Grace box (default: this machine's)
    platforms: list[str] = field(default_factory=list)

    def __post_init__(self):
        require(self, above={"max_mib": 0})
        unknown = sorted(set(self.leave_out) - set(WHEELHOUSE))
        if unknown:
            raise ValueError(f"leave_out: not in the wheelhouse list: {unknown} (it holds {', '.join(WHEELHOUSE)})")


def wheelhouse_mib(directory: Path) -> dict[str, float]:
    """Size in MiB of every wheel in ``directory``."""
    return {p.name: p.stat().st_size / 2**20 for p in sorted(Path(directory).glob("*.whl"))}


def check_wheelhouse(directory: Path, max_mib: float) -> float:
    """The wheelhouse's total MiB; ValueError naming the largest wheels when it is over ``max_mib``."""
    sizes = wheelhouse_mib(directory)
    if not sizes:
        raise ValueError(f"{directory}: no wheels in it")
    total = sum(sizes.values())
    if total > max_mib:
        largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
        raise ValueError(
            f"{directory}: {total:.1f} MiB of wheels, over the {max_mib:g} MiB limit; largest: "
            + ", ".join(f"{n} {m:.1f} MiB" for n, m in largest)
            + " (leave out what the box already has: --leave_out='[...]')"
        )
    return total


def build_wheelhouse(cfg: GpuWheelsConfig) -> int:
    import importlib.metadata as md
    import sys

    dest = Path(cfg.dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = [n for n in WHEELHOUSE if n not in cfg.leave_out]
    specs = []
    for n in names:
        try:
            specs.append(f"{n}=={md.version(n)}")  # this machine's version: the one the tests ran with
        except md.PackageNotFoundError:
            specs.append(n)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), *specs]
    if cfg.python_version:
        cmd[5:5] = ["--python-version", cfg.python_version]
    for tag in cfg.platforms:
        cmd[5:5] = ["--platform", tag]
    print(f"[wheels] {' '.join(cmd[3:6])} ... {len(specs)} distributions -> {dest}")
    subprocess.run(cmd, check=True)
    (dest / "requirements.txt").write_text(
        "".join(f"{s}\n" if s.split("==")[0] in PINNED else f"{s.split('==')[0]}\n" for s in specs)
    )
    for name, mib in sorted(wheelhouse_mib(dest).items(), key=lambda kv: -kv[1]):
        print(f"{mib:8.2f} MiB  {name}")
    total = check_wheelhouse(dest, cfg.max_mib)
    print(f"{total:.1f} MiB in {dest} (limit {cfg.max_mib:g} MiB); left out: {', '.join(cfg.leave_out) or 'nothing'}")
    return 0


def _print_summary(report: dict) -> None:
    for name, entry in report["backbones"].items():
        params = entry.get("parameters")
        head = f"{name:<8} {params / 1e6:,.1f} M params" if params else f"{name:<8}"
        lat = ", ".join(f"{m} p50 {v['p50_ms']:.1f} ms" for m, v in entry.get("latency", {}).items())
        print(f"{head}: {lat or 'no latency'}")
    if report["ppo"]:
        p = report["ppo"]
        mem = f", peak {p['peak_memory_allocated_gib']} GiB" if "peak_memory_allocated_gib" in p else ""
        print(f"pi0 PPO update ({p['batch_chunks']} chunks): {p['update_ms_p50']} ms{mem}")
    for part, why in report["skipped"].items():
        print(f"  skipped {part}: {why}")
    for part, why in report["failed"].items():
        print(f"  FAILED {part}: {why}")


def main() -> None:
    """`python -m pirl_tools.gpu_check ...`: the check without pirl-bench's other commands' imports."""
    import sys

    from pirl.cli import parse_config, run_cli

    argv = sys.argv[1:]
    if argv[:1] == ["wheels"]:
        wheels = parse_config(GpuWheelsConfig, prog="python -m pirl_tools.gpu_check wheels", args=argv[1:])
        run_cli(lambda: build_wheelhouse(wheels))
    cfg = parse_config(GpuCheckConfig, prog="pirl-bench gpu", args=argv)
    run_cli(lambda: run(cfg, "pirl-bench gpu " + " ".join(argv)))


if __name__ == "__main__":
    main()

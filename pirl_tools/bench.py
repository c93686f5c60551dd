"""pirl-bench: measured runs whose figures go into BENCHMARKS.md.

    pirl-bench learn --out=DIR [--noise_method='[flow_sde,flow_noise]'] [--seeds='[0,1,2]'] [--grpo=true]
                     [--denoise_steps='[4]'] [--noise_levels='[0.5]'] [--iterations=200] ...
                     [--policy_path=SFT --env.type=... | --sim_env=GYM_ID --env_kwargs='{...}']

    pirl-bench robot --out=DIR [--methods='[baseline,small_updates,interventions_bc]'] [--seeds='[0]'] [--target=0.9]

    pirl-bench metaworld --out=DIR [--tasks='[reach-v3,push-v3]'] [--noise_method='[flow_noise,flow_sde]'] [--time_limit=1800]

    pirl-bench infer --out=DIR [--batch=1] [--iterations=200] [--warmup=20] [--threads=1]
                     [--policy_path=PRETRAINED_DIR] [--noise_method=flow_sde] [--backends='[torch_eager]']

    pirl-bench schedule --out=DIR [--latency_ms=60] [--control_hz=50] [--swaps=10] [--duration_s=60]

    pirl-bench fleet --out=DIR [--robots='[8,16,32]'] [--duration=60] [--rate_hz=2] [--image_side=96]

    pirl-bench gpu --out=DIR [--time_budget_s=420] [--backbones='[pi0,pi05,smolvla]'] [--batch=32] [--dry=true]

    pirl-bench refit --out=DIR [--backbone=smolvla --size=reduced] [--chunk_bytes=65536]

Each command takes a draccus config (BenchLearnConfig, BenchInferConfig below): `pirl-bench learn
--help` lists every field with its documentation.

``learn``: in one process (no network) SFT from scripted demos (LeRobot's train loop), then PI-RL
with periodic deterministic evaluation; writes DIR/learn.json and DIR/learn.png. On your own env
(``--env.type`` or ``--sim_env``) it starts from ``--policy_path`` (e.g. what ``pirl-sft`` wrote for it).

``infer``: exports the sampler to ONNX (DIR/onnx) and times one chunk inference (one
``sample_chains`` call: host numpy in, host numpy out) on every backend with the same inputs,
interleaved call by call so background load hits all backends alike: PyTorch eager and ONNX
Runtime CPU; with CUDA also PyTorch eager CUDA, the torch sampler replayed as a CUDA graph,
torch.compile, ONNX Runtime CUDA, and TensorRT (the backend's own strongly typed engine, plain
enqueue and CUDA-graph replay); each one that cannot run is listed under "skipped" with the reason.
Writes DIR/infer.json.

``gpu``: for a bare GPU box (``make gpu-check``, docs/gpu_check.md): real-size pi0 / pi0.5 / SmolVLA (random
init, bf16) one-chunk latency with PyTorch eager, CUDA-graph replay and torch.compile, pi0's PPO update time and
peak memory, and the machine, inside a time budget (what does not fit is listed under "skipped");
``--dry=true`` is the CPU dry mode (reduced sizes) the tests run (pirl_tools/gpu_check.py); writes
DIR/gpu_check.json.

``robot``: episodes and robot-time from few-shot SFT to a success target on ONE simulated robot with a
scripted person labelling and taking over, learner and edge as processes (pirl_tools/bench_robot.py);
writes DIR/robot.json and DIR/robot.png.

``schedule``: a paced edge whose inference takes ``latency_ms`` (the real sampler plus a sleep) across
``swaps`` policy swaps, with the measured lead and, side by side, the one-tick schedule; every record is
replayed by its version's policy (pirl_tools/bench_schedule.py); writes DIR/schedule.json.

``metaworld``: per MetaWorld task (MT10 by default) few-shot SFT from MetaWorld's scripted expert, then PI-RL
per noise method on the full state observation, in process (pirl_tools/bench_metaworld.py); writes
DIR/metaworld.json and DIR/metaworld.png.

``fleet``: per robot count, one pirl-learner over TLS and that many simulated robots (the edge's spool,
uploader and subscriber in threads of a few processes, records of one camera frame's size at ``rate_hz``):
records/s, ack latency, publish fan-out, learner CPU per 1k records, lost and duplicated records; then a
burst of the same records through ours and through LeRobot's ``lerobot.transport`` (``lerobot_transport_ratio``)
(pirl_tools/bench_fleet.py); writes DIR/fleet.json and DIR/fleet.png.
"""

from __future__ import annotations

import gc
import itertools
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from lerobot.envs.configs import EnvConfig

from lerobot_policy_pi_rl.presets import BACKBONE_CHOICES, builtin_policy_overrides, builtin_task_algorithm_config
from lerobot_policy_pi_rl.samplers import NOISE_METHODS, RL_NOISE_METHODS
from pirl.cli import parse_config, require, run_cli, write_json
from pirl_tools import bench_metaworld, bench_robot
from pirl_tools.bench_metaworld import BenchMetaWorldConfig
from pirl_tools.bench_robot import BenchRobotConfig
from pirl_tools.common import check_policy_choice, cpus as _cpus, plot_curves, run_report, sft_checkpoint


def _learn(args: BenchLearnConfig, command: str) -> int:
    from lerobot_policy_pi_rl.envs import sim_env_kwargs
    from lerobot_policy_pi_rl.learn import LearnSettings, run_pirl
    from lerobot_policy_pi_rl.sft import load_policy

    out = Path(args.out)
    estimators = ["ppo"] + (["grpo"] if args.grpo else [])
    grid = list(itertools.product(args.seeds, estimators, args.noise_method, args.denoise_steps, args.noise_levels))
    runs = []
    started = time.monotonic()
    sft_dir = "" if args.backbone == "mlp" else f"{args.backbone}-"
    target = args.env if args.env is not None else (args.sim_env or "pirl_reach")
    env_name = f"env.type={args.env.type}" if args.env is not None else target
    for i, (seed, estimator, method, k, level) in enumerate(grid, 1):
        if args.policy_path is not None:
            ckpt = Path(args.policy_path)
        else:
            ckpt = sft_checkpoint(
                out / "sft" / f"{sft_dir}seed{seed}",
                seed=seed,
                num_demos=args.num_demos,
                steps=args.sft_steps,
                noise_std=args.demo_noise,
                policy_overrides=builtin_policy_overrides(args.backbone),
            )
        policy, pre, post = load_policy(ckpt, noise_method=method, num_denoise_steps=k, noise_level=level)
        label = (
            (f"{args.backbone} " if args.backbone != "mlp" else "")
            + f"{method}"
            + (f" {estimator}" if estimator != "ppo" else "")
        )
        print(f"[{i}/{len(grid)}] {label} seed={seed} K={k} a={level}")
        algo_cfg = builtin_task_algorithm_config(advantage_estimator=estimator, actor_lr=args.actor_lr)
        settings = LearnSettings(
            iterations=args.iterations,
            num_envs=args.num_envs,
            eval_every=args.eval_every,
            eval_episodes=args.eval_episodes,
            seed=seed,
            time_limit_s=args.time_limit,
            env=target,
            env_kwargs=sim_env_kwargs(target, policy.config, args.success_key, args.env_kwargs, args.async_envs),
        )
        res = run_pirl(policy, pre, post, algo_cfg, settings)
        runs.append(
            {
                "label": label,
                "env": env_name,
                "backbone": args.backbone,
                "noise_method": method,
                "estimator": estimator,
                "seed": seed,
                "num_denoise_steps": k,
                "noise_level": level,
                "sft_success": res.sft_success,
                "final_success": res.final_success,
                "best_success": res.best_success,
                "env_steps": res.env_steps,
                "updates": res.updates,
                "wall_seconds": round(res.wall_seconds, 2),
                "curve": [[s, v] for s, v in res.curve],
            }
        )
        print(
            f"[{i}/{len(grid)}] done: SFT {res.sft_success:.3f} -> final {res.final_success:.3f} "
            f"(best {res.best_success:.3f}) in {res.wall_seconds:.0f}s, {res.env_steps} env steps"
        )
        write_json(out / "learn.json", _report(command, runs))
    plot_curves(out / "learn.png", runs, f"PI-RL on {env_name} (deterministic eval)")
    print(f"wrote {out / 'learn.json'} and {out / 'learn.png'} ({time.monotonic() - started:.0f}s)")
    return 0


def _report(command: str, runs) -> dict:
    return run_report(command, runs)


# --- infer: one chunk's latency per inference backend ---------------------------------------------

TORCH = "torch_eager"
CPU_BACKENDS = (TORCH, "onnxruntime_cpu", "onnxruntime_cpu_split")
GPU_BACKENDS = (
    "torch_eager_cuda",
    "torch_cuda_graph",
    "torch_compile_cuda",
    "onnxruntime_cuda",
    "tensorrt",
    "tensorrt_cuda_graph",
)
INFER_BACKENDS = CPU_BACKENDS + GPU_BACKENDS


def _infer_policy(args):
    """(policy, description): the checkpoint at policy_path, a randomly initialised VLA
    (backbone), or a fresh default pi_rl policy."""
    import torch

    if args.policy_path:
        from lerobot_policy_pi_rl.sft import load_policy

        policy, _, _ = load_policy(args.policy_path)
        return policy, f"checkpoint {args.policy_path}"
    if args.backbone != "mlp":
        return _vla_policy(args)
    from lerobot.configs.types import FeatureType, PolicyFeature

    from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig
    from lerobot_policy_pi_rl.modeling_pi_rl import PiRLPolicy
    from lerobot_policy_pi_rl.sft import dataset_features

    feats = dataset_features("state", 32)  # the built-in task: state 6, action 3
    torch.manual_seed(args.seed)
    cfg = PiRLConfig(
        device="cpu",
        push_to_hub=False,
        input_features={
            "observation.state": PolicyFeature(FeatureType.STATE, tuple(feats["observation.state"]["shape"]))
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, tuple(feats["action"]["shape"]))},
    )
    policy = PiRLPolicy(cfg).eval()
    return policy, (
        f"freshly initialised default pi_rl policy (seed {args.seed}) for the built-in task's shapes "
        f"(state {feats['observation.state']['shape'][0]}, action {feats['action']['shape'][0]}); no checkpoint"
    )


def _vla_policy(args, device: str = "cpu", dtype: str | None = None):
    """A randomly initialised pi_rl VLA: LeRobot's real modeling code at full size (the released
    architectures: PaliGemma 2B + Gemma 300M for pi0 / pi0.5, SmolVLM2 500M for SmolVLA; no weights
    needed to time it) or at the reduced CPU size of the tests. ``device``: where its weights are
    created (initialising 3.5 B parameters on a GPU takes seconds, on the CPU minutes); ``dtype``: pi0 /
    pi0.5's ``dtype`` (default bfloat16 at full size with CUDA, else float32; SmolVLA has no such field)."""
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature

    from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig
    from lerobot_policy_pi_rl.modeling_pi_rl import PiRLPolicy

    size = args.size or ("full" if torch.cuda.is_available() else "reduced")
    full = size == "full"
    side = 224 if full else 32
    cameras = args.cameras or (3 if full else 1)
    feats = {f"observation.images.cam{i}": PolicyFeature(FeatureType.VISUAL, (3, side, side)) for i in range(cameras)}
    feats["observation.state"] = PolicyFeature(FeatureType.STATE, (8,))  # a 7-DoF arm + gripper (LIBERO's shapes)
    fields = {"chunk_size": 50, "n_action_steps": 5, "num_denoise_steps": args.num_denoise_steps or 10}
    vlm_source, vlm_from_hub = "", False  # a full-size SmolVLA's VLM architecture: hub config or offline copy
    if full:
        base = {"dtype": dtype or ("bfloat16" if torch.cuda.is_available() else "float32")}
        if args.backbone == "smolvla":  # the VLM's architecture from its config; weights random
            from lerobot_policy_pi_rl.backbones.smolvlm2_offline import HUB_ID, smolvlm2_500m_dir

            vlm_from_hub = args.smolvlm_config == "hub"
            base = {"load_vlm_weights": False, "vlm_model_name": HUB_ID if vlm_from_hub else str(smolvlm2_500m_dir())}
            vlm_source = f"SmolVLM2-500M config from {'the hub' if vlm_from_hub else 'its offline copy'}; "
    else:
        fields.update(chunk_size=8, n_action_steps=4, num_denoise_steps=args.num_denoise_steps or 4)
        base = {"tokenizer_max_length": 16, **({"dtype": dtype} if dtype and args.backbone != "smolvla" else {})}
    torch.manual_seed(args.seed)
    cfg = PiRLConfig(
        device=device,
        push_to_hub=False,
        backbone=args.backbone,
        backbone_config=base,
        backbone_reduced=None if full else {},
        input_features=feats,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (7,))},
        **fields,
    )
    try:
        with torch.device(device):
            policy = PiRLPolicy(cfg).eval()
    except OSError as e:  # transformers' "couldn't connect to huggingface.co" for the hub config
        if vlm_from_hub:
            raise ValueError(
                f"backbone=smolvla size=full reads {HUB_ID}'s config from the hub, which is out of "
                f"reach here ({str(e).splitlines()[0]}); smolvlm_config=offline builds the same "
                f"architecture from the copy in backbones/smolvlm2_offline.py"
            ) from None
        raise
    return policy, (
        f"randomly initialised {args.backbone} ({size} size: {vlm_source}"
        f"{cameras} camera(s) {side}x{side}, state 8, "
        f"action 7 padded to {cfg.model_action_dim}, {cfg.language_length} language tokens, chunk "
        f"{cfg.chunk_size}, K={cfg.num_denoise_steps}"
        + ("" if full else "; LeRobot's modeling code at the reduced CPU size of backbones/reduced.py")
        + ")"
    )


def _infer_inputs(policy, batch: int, seed: int) -> dict:
    """Normalised observations and sampler noise (numpy), shared by every backend."""
    import numpy as np
    import torch

    from pirl.export.onnx_export import example_observations

    c = policy.config
    g = torch.Generator().manual_seed(seed)
    obs = {k: v.numpy() for k, v in example_observations(policy, batch, g).items()}
    initial, steps, stochastic = policy.draw_noise(batch, generator=g, device="cpu")
    return {
        "obs": obs,
        "initial_noise": initial.numpy(),
        "step_noise": steps.numpy(),
        "stochastic": stochastic.numpy(),
        "noise_level": np.full((batch,), c.noise_level, dtype=np.float32),
    }


def _torch_backend(policy, inp, noise_method, device: str):
    import torch

    def to(x, dtype=None):
        return torch.from_numpy(x).to(device=device, dtype=dtype)

    def run():
        with torch.no_grad():
            obs = {k: to(v) for k, v in inp["obs"].items()}
            s = policy.sample_chains(
                obs,
                to(inp["initial_noise"]),
                to(inp["step_noise"]),
                to(inp["stochastic"]),
                noise_level=to(inp["noise_level"]),
                noise_method=noise_method,
            )
            outs = (s.actions, s.chain.chain, s.chain.log_prob, s.value)
            return dict(zip(("actions", "chain", "log_prob", "value"), (o.cpu().numpy() for o in outs), strict=True))

    return run


def _compile_backend(policy, inp, noise_method, mode: str):
    import torch

    from pirl.export.onnx_export import SamplerGraph

    compiled = torch.compile(SamplerGraph(policy, noise_method), mode=mode)

    def run():
        with torch.no_grad():
            args = [torch.from_numpy(inp["obs"][k]).cuda() for k in inp["obs"]]  # observation_spec order
            args += [
                torch.from_numpy(inp[n]).cuda().float()
                for n in ("initial_noise", "step_noise", "stochastic", "noise_level")
            ]
            outs = compiled(*args)
            return dict(zip(("actions", "chain", "log_prob", "value"), (o.cpu().numpy() for o in outs), strict=True))

    return run


def _torch_cuda_graph_backend(policy, inp, noise_method):
    """The torch sampler (``SamplerGraph``) captured once as a CUDA graph on static CUDA inputs and
    replayed: one launch per chunk instead of one per kernel."""
    import torch

    from pirl.export.onnx_export import SamplerGraph

    graph_module = SamplerGraph(policy, noise_method)
    static_in = [torch.from_numpy(inp["obs"][k]).cuda() for k in sorted(inp["obs"])]
    static_in += [
        torch.from_numpy(inp[n]).cuda().float() for n in ("initial_noise", "step_noise", "stochastic", "noise_level")
    ]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):  # warm-up on a side stream before capture, as torch.cuda.graph asks
            graph_module(*static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = graph_module(*static_in)

    def run():
        arrays = [inp["obs"][k] for k in sorted(inp["obs"])] + [
            inp[n] for n in ("initial_noise", "step_noise", "stochastic", "noise_level")
        ]
        for buf, arr in zip(static_in, arrays, strict=True):
            buf.copy_(torch.from_numpy(arr))
        graph.replay()
        return dict(zip(("actions", "chain", "log_prob", "value"), (o.cpu().numpy() for o in static_out), strict=True))

    return run


def _tensorrt_backend(export_dir: Path, inp: dict, batch: int, cuda_graph: bool, refit: bool, notes: dict, built: dict):
    """An engine built by the TensorRT backend's own code (pirl.export.trt_engine: strongly
    typed FP32, TF32 off, fixed batch profile = the timed batch, no REFIT: the bench measures the
    plain engine; ``trt_refit=true`` builds a refittable one to measure REFIT's cost), run by its runner
    (static buffers; CUDA-graph replay when ``cuda_graph``)."""
    from pirl.export.onnx_export import load_manifest, make_feeds
    from pirl.export.trt_engine import EngineManager, EngineRunner, TensorRTSettings

    settings = TensorRTSettings(batch_min=batch, batch_opt=batch, batch_max=batch, refit=refit, cuda_graph=cuda_graph)
    root, manifest = load_manifest(export_dir)
    if not built:  # one engine, two runners (plain enqueue, CUDA graph)
        manager = EngineManager(settings)
        started = time.perf_counter()
        built.update(manager=manager, prepared=manager.prepare(root, manifest))
        notes["tensorrt"] = (
            f"TensorRT {manager.tensorrt_version}, strongly typed FP32 engine (TF32 off), fixed "
            f"batch {batch}, refit {'on' if refit else 'off'}, built in "
            f"{time.perf_counter() - started:.1f}s"
        )
    runner = EngineRunner(built["manager"].trt, built["prepared"].engine, settings)
    feeds = make_feeds(
        manifest, inp["obs"], inp["initial_noise"], inp["step_noise"], inp["stochastic"], inp["noise_level"]
    )
    return lambda: runner.run(feeds)


def _infer(args: BenchInferConfig, command: str) -> int:
    import copy

    import numpy as np
    import onnxruntime as ort
    import torch

    from pirl.export.onnx_export import OnnxSampler, export_onnx
    from pirl.export.split_export import SplitSampler, export_split

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    policy, source = _infer_policy(args)
    c = policy.config
    noise_method = args.noise_method or c.noise_method
    print(f"[infer] policy: {source} ({_count(policy) / 1e6:,.1f} M parameters)")
    selected = set(args.backends or INFER_BACKENDS) | {TORCH}  # PyTorch eager: the baseline of every ratio
    backends, skipped, notes = {}, {}, {}
    for name in INFER_BACKENDS:
        if name not in selected:
            skipped[name] = "not selected (backends)"
    manifest, export_seconds, split_manifest = None, None, None
    if selected & {"onnxruntime_cpu", "onnxruntime_cuda", "tensorrt", "tensorrt_cuda_graph"}:
        print(f"[infer] exporting the {noise_method} sampler to {out / 'onnx'}")
        started = time.perf_counter()
        manifest = export_onnx(policy, out / "onnx", noise_method=noise_method, opset=args.opset)
        export_seconds = time.perf_counter() - started
    inp = _infer_inputs(policy, args.batch, args.seed)

    backends[TORCH] = _torch_backend(policy, inp, noise_method, "cpu")
    if "onnxruntime_cpu" in selected:
        ort_cpu = OnnxSampler(out / "onnx", threads=args.threads)
        backends["onnxruntime_cpu"] = lambda: ort_cpu.run(
            inp["obs"], inp["initial_noise"], inp["step_noise"], inp["stochastic"], inp["noise_level"]
        )
    if "onnxruntime_cpu_split" in selected:
        # the alternative layout: prefix graph + one-step velocity graph, the K-step loop on the host
        split_manifest = export_split(policy, out / "onnx_split", opset=args.opset)
        split = SplitSampler(policy, out / "onnx_split", noise_method=noise_method, threads=args.threads)
        backends["onnxruntime_cpu_split"] = lambda: split.run(
            inp["obs"], inp["initial_noise"], inp["step_noise"], inp["stochastic"], inp["noise_level"]
        )
    gpu_names = [n for n in GPU_BACKENDS if n in selected]
    if not gpu_names:
        pass
    elif not torch.cuda.is_available():
        for name in gpu_names:
            skipped[name] = "no CUDA device (torch.cuda.is_available() is False)"
    else:
        gpu_policy = copy.deepcopy(policy).to("cuda").eval()
        built: dict = {}
        candidates = {
            "torch_eager_cuda": lambda: _torch_backend(gpu_policy, inp, noise_method, "cuda"),
            "torch_cuda_graph": lambda: _torch_cuda_graph_backend(gpu_policy, inp, noise_method),
            "torch_compile_cuda": lambda: _compile_backend(gpu_policy, inp, noise_method, args.compile_mode),
            "onnxruntime_cuda": lambda: _ort_cuda(out / "onnx", ort, inp),
            "tensorrt": lambda: _tensorrt_backend(out / "onnx", inp, args.batch, False, args.trt_refit, notes, built),
            "tensorrt_cuda_graph": lambda: _tensorrt_backend(
                out / "onnx", inp, args.batch, True, args.trt_refit, notes, built
            ),
        }
        for name, make in candidates.items():
            if name not in selected:
                continue
            try:
                fn = make()
                fn()  # first call: builds / compiles, and proves the backend runs
                backends[name] = fn
            except Exception as e:  # noqa: BLE001 - any failure is recorded as the skip reason
                skipped[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
                print(f"[infer] skipping {name}: {skipped[name]}")

    # parity: the same inputs through every backend, against PyTorch eager (CPU)
    ref = backends[TORCH]()
    parity = {}
    for name, fn in backends.items():
        got = fn()
        parity[name] = {k: float(np.max(np.abs(got[k] - ref[k]))) for k in ("actions", "chain", "log_prob", "value")}

    print(
        f"[infer] timing {len(backends)} backends, batch {args.batch}, {args.threads} thread(s): "
        f"{args.warmup} warmup + {args.iterations} timed calls each, interleaved"
    )
    for _ in range(args.warmup):
        for fn in backends.values():
            fn()
    times = {name: [] for name in backends}
    gc.collect()
    gc.disable()
    try:
        for _ in range(args.iterations):
            for name, fn in backends.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()

    base = float(np.median(times[TORCH]))
    results = {}
    for name, ts in times.items():
        med = float(np.median(ts))
        results[name] = {
            "median_ms": round(med, 4),
            "p99_ms": round(float(np.percentile(ts, 99)), 4),
            "ratio_vs_torch": round(med / base, 4),
        }
    report = {
        "backends": results,
        "parity_max_abs_err": parity["onnxruntime_cpu"]["actions"] if "onnxruntime_cpu" in parity else None,
        "parity_max_abs_err_by_backend": parity,
        "skipped": skipped,
        "machine": _machine(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "batch": args.batch,
        "threads": args.threads,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "export_seconds": round(export_seconds, 3) if export_seconds is not None else None,
        "artifact_bytes": {name: a["bytes"] for name, a in manifest["artifacts"].items()} if manifest else {},
        "split_export": {
            "export_seconds": split_manifest["export_seconds"],
            "artifact_bytes": {n: a["bytes"] for n, a in split_manifest["artifacts"].items()},
        }
        if split_manifest
        else None,
        "policy": {
            "source": source,
            "noise_method": noise_method,
            "num_denoise_steps": c.num_denoise_steps,
            "chunk_size": c.chunk_size,
            "action_dim": c.action_dim,
            "model_action_dim": c.model_action_dim,
            "parameters": _count(policy),
            "parameters_by_module": _parameter_breakdown(policy),
        },
        "notes": {
            "measured": "one chunk inference = one sample_chains call (prefix + K denoise steps + log-prob + value), "
            "host numpy inputs to host numpy outputs (GPU backends include the copies)",
            "ratio_vs_torch": f"median_ms / median_ms of {TORCH} (PyTorch eager on CPU)",
            "parity_max_abs_err": "max |actions(onnxruntime_cpu) - actions(torch_eager)| on the timed inputs",
            "schedule": "backends called round-robin, one call each per iteration, garbage collector off",
            "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
            "onnx_opset": manifest["opset"] if manifest else None,
            "torch_compile_mode": args.compile_mode,
            **notes,
        },
    }
    write_json(out / "infer.json", report)
    _print_table(results, skipped, report)
    print(f"wrote {out / 'infer.json'}")
    return 0


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _parameter_breakdown(policy, min_share: float = 0.01, max_depth: int = 6) -> dict[str, int]:
    """Parameters of every module holding >= ``min_share`` of the policy's, down to ``max_depth``
    (wrappers that hold exactly what their one big child holds are left out): shows at a glance which
    architecture was built (vision tower, language model, action expert, heads)."""
    total = _count(policy)
    out, counts = {}, {}
    for name, module in policy.named_modules():
        if not name or name.count(".") >= max_depth:
            continue
        n = counts[name] = _count(module)
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if n >= min_share * total and counts.get(parent) != n:
            out[name] = n
    return out


def _ort_cuda(export_dir: Path, ort, inp: dict):
    from pirl.export.onnx_export import OnnxSampler

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (CPU build; install onnxruntime-gpu)"
        )
    sampler = OnnxSampler(export_dir, providers=["cuda"])
    if sampler.providers[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"CUDAExecutionProvider did not initialise (session providers {sampler.providers})")
    return lambda: sampler.run(
        inp["obs"], inp["initial_noise"], inp["step_noise"], inp["stochastic"], inp["noise_level"]
    )


def _print_table(results: dict, skipped: dict, report: dict) -> None:
    print(f"\n{'backend':<20}{'median_ms':>11}{'p99_ms':>11}{'x torch':>9}")
    for name, r in results.items():
        print(f"{name:<20}{r['median_ms']:>11.3f}{r['p99_ms']:>11.3f}{r['ratio_vs_torch']:>9.2f}")
    for name, why in skipped.items():
        print(f"{name:<20}  skipped: {why}")
    if report["parity_max_abs_err"] is not None:
        print(
            f"parity (onnxruntime_cpu vs torch_eager actions): max abs err {report['parity_max_abs_err']:.2e}; "
            f"export {report['export_seconds']:.2f}s"
        )
    print(f"batch {report['batch']}, {report['threads']} thread(s)\n")


def _machine() -> str:
    import torch

    m = f"{platform.machine()} {platform.processor() or ''} {_cpus()} CPUs, {platform.python_version()}".replace(
        "  ", " "
    )
    if torch.cuda.is_available():
        m += f", {torch.cuda.get_device_name(0)}"
    return m.strip()


@dataclass
class BenchLearnConfig:
    """pirl-bench learn: SFT from scripted demos, then PI-RL for every combination of the grid; writes
    OUT/learn.json and OUT/learn.png. Lists are given as --seeds='[0,1,2]'."""

    # output directory (SFT checkpoints under OUT/sft are reused) (required)
    out: str | None = None
    # samplers to run (flow_sde, flow_noise)
    noise_method: list[str] = field(default_factory=lambda: ["flow_sde", "flow_noise"])
    # seeds to run
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # also run the critic-free GRPO variant
    grpo: bool = False
    # K values (ablation grid)
    denoise_steps: list[int] = field(default_factory=lambda: [4])
    # Flow-SDE noise levels a (ablation grid)
    noise_levels: list[float] = field(default_factory=lambda: [0.5])
    # PI-RL updates per run
    iterations: int = 400
    # episodes per update
    num_envs: int = 256
    # deterministic evaluation every this many updates
    eval_every: int = 20
    # episodes per deterministic evaluation
    eval_episodes: int = 200
    # actor learning rate (the rest: the built-in task preset)
    actor_lr: float = 3e-5
    # wall-time cap per run, seconds
    time_limit: float = 600.0
    # scripted demonstrations for SFT
    num_demos: int = 10
    # action noise of the scripted expert
    demo_noise: float = 0.1
    # SFT training steps
    sft_steps: int = 2000
    # mlp, or LeRobot's pi0 / pi05 / smolvla at the reduced CPU size (camera + instruction)
    backbone: str = "mlp"
    # start every run from this SFT checkpoint (a LeRobot pretrained_model dir, e.g. pirl-sft's) instead of
    # recording the built-in task's demos and training one
    policy_path: str | None = None
    # the env to learn and evaluate on: a LeRobot env type, as lerobot-eval takes it (--env.type=...
    # --env.task=...). None: sim_env
    env: EnvConfig | None = None
    # or a gymnasium id ('module:id' imports the module first) or an env a plugin registers; None: the built-in
    # task
    sim_env: str | None = None
    # keyword arguments of sim_env (gymnasium.make's for a gymnasium id)
    env_kwargs: dict = field(default_factory=dict)
    # the info key the env reports success under (LeRobot's 'is_success'; MetaWorld's gymnasium envs: 'success')
    success_key: str = "is_success"
    # run the envs of env / sim_env in subprocesses (gymnasium's AsyncVectorEnv)
    async_envs: bool = False

    def __post_init__(self):
        if not self.out:
            raise ValueError("out: required (the output directory)")
        if self.env is not None and self.sim_env is not None:
            raise ValueError("sim_env: give --env.type or --sim_env, not both")
        if (self.env is not None or self.sim_env is not None) and self.policy_path is None:
            raise ValueError(
                "policy_path: PI-RL on your env starts from an SFT checkpoint of it (pirl-sft --env.type=... or "
                "--sim_env=... writes one)"
            )
        positive = ("iterations", "num_envs", "eval_every", "eval_episodes", "num_demos", "sft_steps")
        require(self, at_least=dict.fromkeys(positive, 1))
        if not self.denoise_steps or any(k < 1 for k in self.denoise_steps):
            raise ValueError(f"denoise_steps: every K must be >= 1 (got {self.denoise_steps})")
        if not self.noise_method or set(self.noise_method) - set(RL_NOISE_METHODS):
            raise ValueError(f"noise_method: each must be one of {RL_NOISE_METHODS} (got {self.noise_method})")
        if self.backbone not in BACKBONE_CHOICES:
            raise ValueError(f"backbone: must be one of {BACKBONE_CHOICES} (got {self.backbone!r})")


@dataclass
class BenchInferConfig:
    """pirl-bench infer: export to ONNX and time one chunk inference per backend, side by side; writes
    OUT/infer.json. Lists are given as --backends='[torch_eager,onnxruntime_cpu]'."""

    # output directory (the export goes to OUT/onnx) (required)
    out: str | None = None
    # pretrained_model directory (default: a freshly initialised pi_rl policy for the built-in task)
    policy_path: str | None = None
    # decisions per inference call
    batch: int = 1
    # timed calls per backend
    iterations: int = 200
    # untimed calls per backend first
    warmup: int = 20
    # torch and ONNX Runtime intra-op threads (1: comparable figures on a shared machine)
    threads: int = 1
    # sampler to time (default: the policy's configured one)
    noise_method: str | None = None
    # ONNX opset of the export
    opset: int = 17
    # torch.compile mode on GPU
    compile_mode: str = "default"
    # build the TensorRT engines refittable (BuilderFlag.REFIT), to measure what REFIT costs
    trt_refit: bool = False
    # policy init (without policy_path) and inputs
    seed: int = 0
    # time a randomly initialised VLA (pi0 / pi05 / smolvla) instead of the default MLP policy
    backbone: str = "mlp"
    # VLA size: full (the released architecture; default with CUDA) or reduced (default on CPU)
    size: str | None = None
    # full-size SmolVLA: read SmolVLM2-500M's architecture from the hub (LeRobot's path) or from the copy
    # written out in backbones/smolvlm2_offline.py (offline: no network)
    smolvlm_config: str = "hub"
    # VLA cameras (default 3 at full size, 1 reduced)
    cameras: int | None = None
    # VLA K (default 10 at full size, as the public pi0.5 anchors; 4 reduced)
    num_denoise_steps: int | None = None
    # time only these (default: all; torch_eager always runs, as the baseline); exports happen only for the
    # ONNX / TensorRT ones, so a full-size VLA on a CPU box can run torch_eager alone
    backends: list[str] | None = None

    def __post_init__(self):
        if not self.out:
            raise ValueError("out: required (the output directory)")
        require(self, at_least={"batch": 1, "iterations": 1, "threads": 1, "warmup": 0})
        if self.noise_method is not None and self.noise_method not in NOISE_METHODS:
            raise ValueError(f"noise_method: must be one of {NOISE_METHODS} (got {self.noise_method!r})")
        check_policy_choice(self.backbone, self.size, self.smolvlm_config)
        unknown = sorted(set(self.backends or ()) - set(INFER_BACKENDS))
        if unknown:
            raise ValueError(f"backends: unknown {unknown}; choices: {', '.join(INFER_BACKENDS)}")


def _robot(cfg: BenchRobotConfig, command: str) -> int:
    return bench_robot.run(cfg, command)


def _metaworld(cfg: BenchMetaWorldConfig, command: str) -> int:
    return bench_metaworld.run(cfg, command)


COMMANDS = {
    "learn": (BenchLearnConfig, "_learn"),
    "infer": (BenchInferConfig, "_infer"),
    "robot": (BenchRobotConfig, "_robot"),
    "metaworld": (BenchMetaWorldConfig, "_metaworld"),
}
# subcommands that live in their own module (pirl_tools/bench_<name>.py: a draccus config class and
# run(cfg, command) -> exit code), imported only when asked for: name -> (module, config class)
MODULE_COMMANDS = {
    "schedule": ("pirl_tools.bench_schedule", "BenchScheduleConfig"),
    "sync": ("pirl_tools.bench_sync", "BenchSyncConfig"),
    "gpu": ("pirl_tools.gpu_check", "GpuCheckConfig"),
    "fleet": ("pirl_tools.bench_fleet", "BenchFleetConfig"),
    "refit": ("pirl_tools.bench_refit", "BenchRefitConfig"),
}


def main() -> None:
    import sys

    argv = sys.argv[1:]
    names = [*COMMANDS, *MODULE_COMMANDS]
    if not argv or argv[0] not in names:
        if argv and argv[0] in ("-h", "--help"):
            print(
                f"usage: pirl-bench {{{','.join(names)}}} [--field=value ...]   (pirl-bench learn --help: its fields)\n"
            )
            print(__doc__)
            sys.exit(0)
        print(f"pirl-bench: error: the first argument must be one of {', '.join(names)}", file=sys.stderr)
        sys.exit(2)
    if argv[0] in MODULE_COMMANDS:
        import importlib

        module_name, cls_name = MODULE_COMMANDS[argv[0]]
        module = importlib.import_module(module_name)
        cls, run = getattr(module, cls_name), module.run
    else:
        cls, run_name = COMMANDS[argv[0]]
        run = globals()[run_name]
    from lerobot.utils.import_utils import register_third_party_plugins

    register_third_party_plugins()  # lerobot_env_* plugins' env types, before --env.type is parsed
    cfg = parse_config(cls, prog=f"pirl-bench {argv[0]}", args=argv[1:])
    command = "pirl-bench " + " ".join(argv)
    run_cli(lambda: run(cfg, command))


if __name__ == "__main__":
    main()

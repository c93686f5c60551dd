"""Which inference backend serves: the requested one's chain (tensorrt -> onnxruntime -> torch), each
link prepared and golden-checked before it may serve, with counted fallbacks.

Its own module because it knows every backend: ``edge.backends`` (torch, ONNX Runtime and what all
backends share) and ``edge.tensorrt_backend`` (which builds on ``edge.backends``) stay acyclic.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge.backends import Fallback, OnnxRuntimeBackend, TorchBackend, check_golden, onnxruntime_providers

log = logging.getLogger(__name__)
BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")


def _chain(name: str) -> list[str]:
    return {
        "torch": [],
        "onnxruntime": ["onnxruntime"],
        "tensorrt": ["tensorrt", "onnxruntime"],
        "auto": ["tensorrt", "onnxruntime"],
    }[name]


def _create(kind: str, policy, workdir, tensorrt_settings, tensorrt_manager):
    if kind == "tensorrt":
        from edge.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(policy, workdir, settings=tensorrt_settings, manager=tensorrt_manager)
    return OnnxRuntimeBackend(policy, workdir, providers=onnxruntime_providers())


def choose_backend(
    name: str,
    policy,
    version: int = 0,
    workdir: Path | None = None,
    *,
    tensorrt_settings=None,
    tensorrt_manager=None,
    golden_check: bool = True,
):
    """(backend prepared for ``version``, fallbacks): the first of ``name``'s chain that loads and
    passes the golden-input check (when ``golden_check``), torch as the last resort.

    Chains: tensorrt -> onnxruntime -> torch; onnxruntime -> torch; auto -> tensorrt (only when its
    prerequisites, tensorrt with builder and a CUDA device, are present) -> onnxruntime -> torch.
    Counted fallbacks (``Fallback.counted``; the metric's label is the backend that failed): an
    explicitly requested backend that fails, whatever the reason (absent TensorRT included); in
    ``auto``, a backend whose prerequisites are present but which still fails (e.g. TensorRT
    installed but the engine build or the golden check fails). Not counted: ``auto`` skipping
    TensorRT on a machine without it (a choice, logged at info), and later links of an explicit
    chain (the requested backend's failure is already counted).
    """
    if name not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {name!r}")
    fallbacks: list[Fallback] = []
    for kind in _chain(name):
        explicit = kind == name
        if kind == "tensorrt" and name == "auto":
            from pirl.export.trt_engine import tensorrt_unavailable_reason

            why = tensorrt_unavailable_reason()
            if why is not None:
                log.info("auto backend: TensorRT not used (%s)", why)
                fallbacks.append(Fallback(kind, why, counted=False))
                continue
        try:
            backend = _create(kind, policy, workdir, tensorrt_settings, tensorrt_manager)
            backend.prepare(version)
            errors = check_golden(backend, policy) if golden_check else None
            log.info(
                "inference backend %s ready for version %d%s",
                kind,
                version,
                f" (golden-input max abs errors {errors})" if errors else "",
            )
            return backend, fallbacks
        except Exception as e:  # noqa: BLE001  any failure to load or to match means: the next one
            reason = f"{type(e).__name__}: {e}"
            counted = explicit or name == "auto"
            fallbacks.append(Fallback(kind, reason, counted))
            (log.warning if counted else log.info)("%s backend unavailable (%s): falling back", kind, reason)
    return TorchBackend(policy), fallbacks


def make_backend(name: str, policy, version: int = 0, workdir: Path | None = None, **options):
    """The requested backend, prepared for ``version``; falls back (logged) when it cannot load."""
    return choose_backend(name, policy, version, workdir, **options)[0]

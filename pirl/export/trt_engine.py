"""TensorRT engines for the exported PI-RL sampler: build, cache, refit, publish, run.

The engine is built from the ONNX export (``pirl.export.onnx_export``: the whole sampler, prefix +
K denoise steps + log-prob + value, every noise tensor an input), so the sampler math still lives only
in ``samplers.py``: TensorRT compiles the traced graph, it does not re-implement it.

Written against the TensorRT 10.x Python API (names checked against the 10.3 bindings, the JetPack 6
version, and the 11.x ones) and imported lazily (``import_tensorrt``): nothing here imports
``tensorrt`` at module import, and a machine without it gets ``TensorRTUnavailableError`` with the reason.

* **Build** (``EngineManager.build_plan``): a *strongly typed* network
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; in TensorRT 11 the flag is deprecated and
  ignored because every network is strongly typed): precision comes from the ONNX types, so no
  FP16 / BF16 / INT8 builder flag is ever set. The export is FP32; TF32 math is off unless
  ``TensorRTSettings.tf32`` (TensorRT enables it by default; it changes FP32 results at the 1e-3
  level). One optimization profile for the batch axis (``batch_min/opt/max``), a workspace limit,
  and ``BuilderFlag.REFIT`` when ``refit`` is on.
* **Cache** (``EngineCache``): serialized plans on disk keyed by ``EngineKey`` (the ONNX graph and
  weights, the graph structure, precision, TensorRT version, GPU name and compute capability, and
  every build setting). Each entry is ``<id>.plan`` + ``<id>.json``; the JSON holds the plan's
  sha256, which is checked before the plan is deserialised; a corrupted or mismatching entry is
  logged, deleted and rebuilt. Writes are atomic (temporary file + rename, JSON last).
* **Refit vs rebuild** (``prepare_order``): an engine built for exactly these bytes (published by the
  learner or cached) is used as it is; otherwise, when refit is on and a refittable engine of the
  *same graph structure* (``graph_structure_sha256``: only weights changed) is at hand (the spare's
  own engine, or a cached one), it is refitted with ``trt.Refitter`` + ``trt.OnnxParserRefitter``
  from the new version's ONNX; anything else (or a failed refit) is a rebuild.
* **Run** (``EngineRunner``): static torch CUDA buffers bound with ``set_tensor_address``,
  ``execute_async_v3`` on a private stream, and CUDA-graph replay when the batch is fixed
  (``batch_min == batch_max``): captured after a first (warm-up) enqueue, as trtexec does, and
  captured again after every refit. TensorRT documents that execution contexts stay valid after a
  refit; it says nothing about graphs captured before one, so they are not reused.

The CPU tests exercise the key, cache, ordering and orchestration logic (with a fake TensorRT
module for the orchestration; see tests/edge/test_tensorrt_backend.py); the ``-m gpu`` tests build,
refit, run and compare with PyTorch where CUDA and TensorRT are present (BENCHMARKS.md says where
they have run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pirl.export.onnx_export import (
    EXTERNAL_DATA_FILE,
    FROZEN_DATA_FILE,
    MODEL_FILE,
    TRAINED_DATA_FILE,
    graph_structure_sha256,
    sha256_file,
    write_manifest,
)

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.plan"
CACHE_FORMAT = "pirl-trt-engine/1"
# How an engine for a new version was obtained, in the order they are tried.
METHODS = ("current", "published", "cache", "refit", "cache_refit", "build")


class TensorRTUnavailableError(RuntimeError):
    """TensorRT (with its builder and ONNX parser) or a CUDA device is not present."""


class EngineBuildError(RuntimeError):
    """The ONNX parser or the builder refused the export."""


class RefitError(RuntimeError):
    """A refit could not be applied (the engine may then hold a mix of old and new weights)."""


@dataclass
class TensorRTSettings:
    """How engines are built, cached and run: the ``tensorrt`` group of ``pirl-edge`` and ``pirl-learner``
    (``--tensorrt.<field>=...``; give the learner the same values as the edges, or its engines are not
    used). Equal ``batch_min`` and ``batch_max`` make the shapes fixed: CUDA graphs are used."""

    # optimization profile of the batch axis: smallest batch (the paced edge decides for one env: 1, 1, 1)
    batch_min: int = 1
    # the batch the engine is tuned for; also the batch of the warm-up and of the golden-input check
    batch_opt: int = 1
    # largest batch
    batch_max: int = 1
    # builder workspace limit (MemoryPoolType.WORKSPACE), MiB
    workspace_mib: int = 1024
    # build refittable engines (BuilderFlag.REFIT) and refit them on a weight sync instead of rebuilding;
    # REFIT may cost some fusions: measure it against a non-refit build on the target (pirl-bench infer)
    refit: bool = True
    # allow TF32 math for FP32 layers (TensorRT's default is on; off so FP32 engines match PyTorch within
    # the golden-check tolerance)
    tf32: bool = False
    # replay the enqueue as a CUDA graph when the batch is fixed
    cuda_graph: bool = True
    # engine cache directory (None: the runtime's default, OUTPUT_DIR/tensorrt-cache on the learner,
    # outputs/edge/<robot_id>/tensorrt-cache on an edge)
    cache_dir: str | None = None
    # engines kept in the cache (the least recently used ones are deleted)
    cache_entries: int = 4

    def __post_init__(self):
        if not 1 <= self.batch_min <= self.batch_opt <= self.batch_max:
            raise ValueError(
                f"tensorrt.batch_min/opt/max: the profile must satisfy 1 <= min <= opt <= max "
                f"(got {self.batch_min},{self.batch_opt},{self.batch_max})"
            )
        if self.workspace_mib < 1:
            raise ValueError(f"tensorrt.workspace_mib: must be >= 1 (got {self.workspace_mib})")
        if self.cache_entries < 1:
            raise ValueError(f"tensorrt.cache_entries: must be >= 1 (got {self.cache_entries})")

    @property
    def fixed_batch(self) -> bool:
        return self.batch_min == self.batch_max


# --- availability --------------------------------------------------------------------------------


def import_tensorrt():
    """The ``tensorrt`` module with its builder and ONNX parser, or TensorRTUnavailableError (the lean /
    dispatch runtimes from PyPI have neither, and import under other names anyway)."""
    try:
        import tensorrt as trt
    except Exception as e:  # noqa: BLE001  ImportError, or OSError from a missing libnvinfer
        raise TensorRTUnavailableError(f"import tensorrt failed ({type(e).__name__}: {e})") from None
    missing = [n for n in ("Builder", "OnnxParser", "Refitter", "OnnxParserRefitter", "Runtime") if not hasattr(trt, n)]
    if missing:
        raise TensorRTUnavailableError(
            f"tensorrt {getattr(trt, '__version__', '?')} lacks {', '.join(missing)} "
            "(a runtime-only install; the builder and ONNX parser are needed)"
        )
    return trt


def cuda_device() -> dict:
    """``{"name", "compute_capability"}`` of the current CUDA device, or TensorRTUnavailableError."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailableError("no CUDA device (torch.cuda.is_available() is False)")
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT engines cannot be built and run here, or None when they can."""
    try:
        import_tensorrt()
        cuda_device()
    except TensorRTUnavailableError as e:
        return str(e)
    return None


# --- cache keys ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Two engines with the same ``id`` are interchangeable;
    engines with the same ``structure_id`` differ only in weights (one can be refitted into the other
    when it was built refittable)."""

    onnx_sha256: str  # the ONNX graph with its weights (model.onnx, and model.onnx.data if any)
    graph_structure_sha256: str  # the graph without weight values
    precision: str  # the export's types (strongly typed build): "fp32"
    tensorrt_version: str
    device_name: str
    compute_capability: str
    batch_profile: tuple[int, int, int]
    workspace_mib: int
    refit: bool
    tf32: bool

    def fields(self) -> dict:
        d = asdict(self)
        d["batch_profile"] = list(self.batch_profile)
        return d

    @classmethod
    def from_fields(cls, d: dict) -> EngineKey:
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            raise ValueError(
                f"engine key fields must be exactly {sorted(names)}, got {sorted(d) if isinstance(d, dict) else d!r}"
            )
        profile = d["batch_profile"]
        if not (isinstance(profile, list | tuple) and len(profile) == 3 and all(isinstance(x, int) for x in profile)):
            raise ValueError(f"engine key batch_profile must be 3 ints, got {profile!r}")
        return cls(**{**d, "batch_profile": tuple(profile)})

    @staticmethod
    def _digest(d: dict) -> str:
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @property
    def id(self) -> str:
        return self._digest(self.fields())

    @property
    def structure_id(self) -> str:
        d = self.fields()
        del d["onnx_sha256"]
        return self._digest(d)


def export_onnx_sha256(manifest: dict) -> str:
    """One hash of the ONNX graph and its weights, from the manifest's (verified) artifact hashes."""
    arts = manifest["artifacts"]
    names = (MODEL_FILE, EXTERNAL_DATA_FILE, FROZEN_DATA_FILE, TRAINED_DATA_FILE)  # a refit export: both data files
    parts = [f"{name}:{arts[name]['sha256']}" for name in names if name in arts]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def engine_key(
    root: str | Path, manifest: dict, settings: TensorRTSettings, tensorrt_version: str, device: dict
) -> EngineKey:
    """The cache key of an engine built from the export in ``root`` (its artifacts already verified)."""
    structure = manifest.get("graph_structure_sha256") or graph_structure_sha256(Path(root) / MODEL_FILE)
    return EngineKey(
        onnx_sha256=export_onnx_sha256(manifest),
        graph_structure_sha256=structure,
        precision=manifest.get("precision", "fp32"),
        tensorrt_version=str(tensorrt_version),
        device_name=str(device["name"]),
        compute_capability=str(device["compute_capability"]),
        batch_profile=(settings.batch_min, settings.batch_opt, settings.batch_max),
        workspace_mib=settings.workspace_mib,
        refit=settings.refit,
        tf32=settings.tf32,
    )


def profile_shapes(name: str, shape: tuple[int, ...], settings: TensorRTSettings):
    """(min, opt, max) shapes of network input ``name`` (``-1`` = dynamic): only the batch axis may
    be dynamic; a static batch must lie inside the profile."""
    if not shape:
        raise EngineBuildError(f"input {name!r} is a scalar; the sampler's inputs all have a batch axis")
    if any(d < 0 for d in shape[1:]):
        raise EngineBuildError(
            f"input {name!r} has a dynamic non-batch axis {list(shape)}; export with fixed feature shapes"
        )
    rest = tuple(shape[1:])
    if shape[0] >= 0:
        if not settings.batch_min <= shape[0] <= settings.batch_max:
            raise EngineBuildError(
                f"input {name!r} was exported with batch {shape[0]}, outside the profile "
                f"{settings.batch_min}..{settings.batch_max}"
            )
        s = (shape[0], *rest)
        return s, s, s
    return ((settings.batch_min, *rest), (settings.batch_opt, *rest), (settings.batch_max, *rest))


def prepare_order(
    key: EngineKey,
    *,
    current: EngineKey | None,
    current_refittable: bool,
    published: EngineKey | None,
    cached_exact: bool,
    cached_refittable: bool,
) -> list[str]:
    """The ways to get an engine for ``key``, in the order to try them (the refit-vs-rebuild rule).

    1. ``current``: the engine in hand already is exactly this one (same key).
    2. ``published``: the learner published an engine with exactly this key (same weights, TensorRT
       version, GPU and settings).
    3. ``cache``: the cache holds an engine with exactly this key.
    4. ``refit``: the engine in hand was built refittable with the same graph structure: refit it
       with the new weights (in place; it is the spare, nothing runs on it).
    5. ``cache_refit``: the cache holds a refittable engine of the same structure: load and refit it.
    6. ``build``: always last.
    A refit is only tried when ``key.refit`` (refit on); a failed step falls through to the next.
    """
    order = []
    if current is not None and current == key:
        order.append("current")
    if published is not None and published == key:
        order.append("published")
    if cached_exact:
        order.append("cache")
    if key.refit and current is not None and current_refittable and current.structure_id == key.structure_id:
        order.append("refit")
    if key.refit and cached_refittable:
        order.append("cache_refit")
    order.append("build")
    return order


# --- the engine cache ----------------------------------------------------------------------------


class EngineCache:
    """Serialized engines on disk: ``<key id>.plan`` and ``<key id>.json`` (key fields, the plan's
    sha256 and size, how and when it was made). The JSON is written last, so an entry exists only
    when complete; a plan whose bytes do not match its JSON, or a JSON that does not match its name
    or its key, is deleted with a warning (and counted in ``rejected``) and the engine is rebuilt."""

    def __init__(self, directory: str | Path, max_entries: int = 4):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self.rejected = 0

    def _paths(self, key_id: str) -> tuple[Path, Path]:
        return self.dir / f"{key_id}.plan", self.dir / f"{key_id}.json"

    def _reject(self, key_id: str, why: str) -> None:
        self.rejected += 1
        log.warning("TensorRT engine cache entry %s ignored and deleted: %s", key_id[:16], why)
        for p in self._paths(key_id):
            p.unlink(missing_ok=True)

    def _load(self, key_id: str) -> tuple[EngineKey, bytes] | None:
        plan_path, meta_path = self._paths(key_id)
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {CACHE_FORMAT!r}")
            key = EngineKey.from_fields(meta["key"])
            if key.id != key_id or meta.get("key_id") != key_id:
                raise ValueError("its key does not match its name")
            plan = plan_path.read_bytes()
            if len(plan) != meta["plan_bytes"] or hashlib.sha256(plan).hexdigest() != meta["plan_sha256"]:
                raise ValueError("the plan's size or sha256 does not match its entry")
        except (OSError, ValueError, KeyError, TypeError) as e:
            self._reject(key_id, str(e))
            return None
        os.utime(meta_path)  # least recently used goes first
        return key, plan

    def get(self, key: EngineKey) -> bytes | None:
        """The verified plan for exactly ``key``, or None."""
        hit = self._load(key.id)
        return hit[1] if hit else None

    def has(self, key: EngineKey) -> bool:
        return self._paths(key.id)[1].is_file()

    def refittable_ids(self, key: EngineKey) -> list[str]:
        """Ids of entries that look refittable into ``key`` (same structure, built with REFIT),
        newest first; read without verifying the plan (``get_by_id`` does that)."""
        found = []
        for meta_path in self.dir.glob("*.json"):
            try:
                meta = json.loads(meta_path.read_text())
                other = EngineKey.from_fields(meta["key"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # _load rejects it if it is ever asked for
            if other.refit and other.structure_id == key.structure_id and other.id != key.id:
                found.append((meta_path.stat().st_mtime, meta_path.stem))
        return [i for _, i in sorted(found, reverse=True)]

    def get_by_id(self, key_id: str) -> tuple[EngineKey, bytes] | None:
        return self._load(key_id)

    def put(self, key: EngineKey, plan: bytes, *, source: str, seconds: float) -> None:
        plan_path, meta_path = self._paths(key.id)
        meta = {
            "format": CACHE_FORMAT,
            "key_id": key.id,
            "structure_id": key.structure_id,
            "key": key.fields(),
            "plan_sha256": hashlib.sha256(plan).hexdigest(),
            "plan_bytes": len(plan),
            "source": source,
            "seconds": round(seconds, 3),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        tag = uuid.uuid4().hex[:8]
        tmp_plan, tmp_meta = plan_path.with_suffix(f".plan.{tag}.tmp"), meta_path.with_suffix(f".json.{tag}.tmp")
        try:
            tmp_plan.write_bytes(plan)
            os.replace(tmp_plan, plan_path)
            tmp_meta.write_text(json.dumps(meta, indent=2))
            os.replace(tmp_meta, meta_path)
        finally:
            tmp_plan.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)
        self._evict()

    def _evict(self) -> None:
        metas = sorted(self.dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for meta_path in metas[self.max_entries :]:
            for p in self._paths(meta_path.stem):
                p.unlink(missing_ok=True)
        for orphan in self.dir.glob("*.plan"):  # a plan without its JSON (crash between the two renames)
            if not (self.dir / f"{orphan.stem}.json").exists():
                orphan.unlink(missing_ok=True)


# --- getting an engine for a version -------------------------------------------------------------


@dataclass
class PreparedEngine:
    """An engine for one export and how it was obtained."""

    engine: object
    key: EngineKey
    method: str  # one of METHODS
    seconds: float
    refittable: bool
    failed: list[str] = field(default_factory=list)  # "<method>: <reason>" of the steps tried first
    valid: bool = True  # False once a failed refit may have left a mix of weights in it

    def info(self) -> dict:
        return {
            "method": self.method,
            "seconds": round(self.seconds, 4),
            "key_id": self.key.id[:16],
            "tensorrt_version": self.key.tensorrt_version,
            "failed": list(self.failed),
        }


class EngineManager:
    """Gets TensorRT engines for exports: published, cached, refitted or built (``prepare``).

    ``trt`` and ``device`` are looked up when not given (TensorRTUnavailableError without them); the
    tests pass a fake module. One manager can serve several backends (the edge's active and spare
    share one, and so its cache)."""

    def __init__(
        self, settings: TensorRTSettings, trt=None, device: dict | None = None, cache: EngineCache | None = None
    ):
        self.settings = settings
        self.trt = trt if trt is not None else import_tensorrt()
        self.device = device if device is not None else cuda_device()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        if cache is None and settings.cache_dir:
            cache = EngineCache(settings.cache_dir, settings.cache_entries)
        self.cache = cache

    @property
    def tensorrt_version(self) -> str:
        return str(getattr(self.trt, "__version__", "unknown"))

    def key(self, root: str | Path, manifest: dict) -> EngineKey:
        return engine_key(root, manifest, self.settings, self.tensorrt_version, self.device)

    # the TensorRT calls -----------------------------------------------------------------------------

    def build_plan(self, onnx_path: str | Path) -> bytes:
        """Build a serialized engine from ``onnx_path`` (strongly typed; see the module docstring)."""
        trt, s = self.trt, self.settings
        builder = trt.Builder(self.logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):  # reads model.onnx.data beside it when present
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"TensorRT {self.tensorrt_version} ONNX parser refused {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_mib << 20)
        if s.refit:
            config.set_flag(trt.BuilderFlag.REFIT)
        if not s.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            profile.set_shape(tensor.name, *profile_shapes(tensor.name, tuple(tensor.shape), s))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineBuildError(
                f"TensorRT {self.tensorrt_version} could not build an engine from {onnx_path} "
                "(see the TensorRT log above)"
            )
        return bytes(plan)

    def deserialize(self, plan: bytes):
        engine = self.runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineBuildError("TensorRT could not deserialize the engine plan")
        return engine

    def refit(self, engine, onnx_path: str | Path) -> None:
        """Refit ``engine`` with the weights of ``onnx_path`` (an export of the same graph). The
        engine must have no work in flight (it is the spare). RefitError leaves it in an undefined
        mix of weights: do not serve it."""
        trt = self.trt
        refitter = trt.Refitter(engine, self.logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, self.logger)
        if not parser_refitter.refit_from_file(str(onnx_path)):
            errors = "; ".join(str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors))
            raise RefitError(f"ONNX refitter refused {onnx_path}: {errors}")
        missing = list(refitter.get_missing_weights())
        if missing:
            raise RefitError(f"{len(missing)} engine weights are not in {onnx_path}, e.g. {missing[:3]}")
        if not refitter.refit_cuda_engine():
            raise RefitError("refit_cuda_engine returned False (see the TensorRT log above)")

    # the refit-vs-rebuild rule ----------------------------------------------------------------------

    def _published(self, root: Path, manifest: dict) -> tuple[EngineKey, Path, str] | None:
        """(key, plan path, plan sha256) of the engine the learner published with this export."""
        entry = manifest.get("tensorrt_engine")
        if not entry:
            return None
        try:
            return EngineKey.from_fields(entry["key"]), root / Path(entry["file"]).name, str(entry["sha256"])
        except (KeyError, TypeError, ValueError) as e:
            log.warning("ignoring the published TensorRT engine entry: %s", e)
            return None

    def prepare(self, root: str | Path, manifest: dict, current: PreparedEngine | None = None) -> PreparedEngine:
        """An engine for the (verified) export in ``root``; ``current`` is the caller's engine, which
        may be refitted in place (then ``current.valid`` turns False if that fails)."""
        root = Path(root)
        key = self.key(root, manifest)
        published = self._published(root, manifest)
        cached_ids = self.cache.refittable_ids(key) if (self.cache is not None and key.refit) else []
        usable_current = current if current is not None and current.valid else None
        order = prepare_order(
            key,
            current=usable_current.key if usable_current else None,
            current_refittable=bool(usable_current and usable_current.refittable),
            published=published[0] if published else None,
            cached_exact=self.cache is not None and self.cache.has(key),
            cached_refittable=bool(cached_ids),
        )
        if published and published[0] != key:
            log.info("the learner's TensorRT engine does not match here (%s): not used", _key_diff(published[0], key))
        failed: list[str] = []
        onnx_path = root / MODEL_FILE
        for method in order:
            started = time.perf_counter()
            try:
                engine = self._obtain(method, key, onnx_path, usable_current, published, cached_ids)
            except (EngineBuildError, RefitError, OSError, ValueError) as e:
                failed.append(f"{method}: {e}")
                log.warning("TensorRT %s for %s failed (%s); trying the next way", method, key.id[:16], e)
                if method == "refit":
                    usable_current.valid = False
                if method == "build":
                    raise EngineBuildError("; ".join(failed)) from e
                continue
            seconds = time.perf_counter() - started
            refittable = bool(getattr(engine, "refittable", False))
            if key.refit and not refittable:
                log.warning("TensorRT engine %s is not refittable although refit is on", key.id[:16])
            log.info(
                "TensorRT engine %s ready by %s in %.3fs%s",
                key.id[:16],
                method,
                seconds,
                f" (after: {'; '.join(failed)})" if failed else "",
            )
            return PreparedEngine(engine, key, method, seconds, refittable, failed)
        raise AssertionError("unreachable: build is always tried")

    def _obtain(self, method, key, onnx_path, current, published, cached_ids):
        if method == "current":
            return current.engine
        if method == "published":
            _, plan_path, entry_sha = published
            if sha256_file(plan_path) != entry_sha:
                raise ValueError(f"{plan_path}: sha256 does not match the manifest's tensorrt_engine entry")
            return self.deserialize(plan_path.read_bytes())
        if method == "cache":
            plan = self.cache.get(key)
            if plan is None:
                raise ValueError("cache entry vanished or was corrupted")
            return self.deserialize(plan)
        if method == "refit":
            self.refit(current.engine, onnx_path)
            return current.engine
        if method == "cache_refit":
            for key_id in cached_ids:
                hit = self.cache.get_by_id(key_id)
                if hit is not None:
                    engine = self.deserialize(hit[1])
                    self.refit(engine, onnx_path)
                    return engine
            raise ValueError("no intact refittable cache entry")
        # build
        started = time.perf_counter()
        plan = self.build_plan(onnx_path)
        seconds = time.perf_counter() - started
        if self.cache is not None:
            try:
                self.cache.put(key, plan, source="build", seconds=seconds)
            except OSError as e:
                log.warning("TensorRT engine cache write failed (%s); the engine is used uncached", e)
        return self.deserialize(plan)


def _key_diff(a: EngineKey, b: EngineKey) -> str:
    """The fields where ``a`` (theirs) differs from ``b`` (ours)."""
    fa, fb = a.fields(), b.fields()
    return ", ".join(f"{k}: {fa[k]!r} vs ours {fb[k]!r}" for k in fa if fa[k] != fb[k]) or "identical"


# --- the learner: publish an engine with the export ----------------------------------------------


class EnginePublisher:
    """Adds a TensorRT engine to every export the learner publishes (``pirl-learner
    --export-tensorrt``): refits its previous engine when only the weights changed, else builds.
    The engine is ``engine.plan`` in the export directory, listed in its manifest under
    ``tensorrt_engine`` with its sha256, size and key fields (edges use it only when the key equals
    their own: same TensorRT version, GPU, settings and weights)."""

    def __init__(self, manager: EngineManager):
        self.manager = manager
        self._current: PreparedEngine | None = None

    def publish(self, root: str | Path, manifest: dict) -> dict:
        root = Path(root)
        prepared = self.manager.prepare(root, manifest, current=self._current)
        self._current = prepared
        plan = bytes(prepared.engine.serialize())
        tmp = root / (ENGINE_FILE + ".tmp")
        tmp.write_bytes(plan)
        tmp.replace(root / ENGINE_FILE)
        entry = {
            "file": ENGINE_FILE,
            "sha256": hashlib.sha256(plan).hexdigest(),
            "bytes": len(plan),
            "key": prepared.key.fields(),
            "method": prepared.method,
            "seconds": round(prepared.seconds, 3),
        }
        manifest["tensorrt_engine"] = entry
        write_manifest(root, manifest)
        return entry


# --- running an engine ---------------------------------------------------------------------------


class EngineRunner:
    """Runs one engine on CUDA with static torch buffers; host numpy in, host numpy out.

    The buffers are (re)bound when the input shapes change; with ``settings.cuda_graph`` and a fixed
    batch profile, the first enqueue at a binding is a plain one (TensorRT may finish setting up on
    it, which must not be captured) and the enqueue is then captured once as a CUDA graph (on a
    private stream, ``thread_local`` capture mode so the other thread's inference is not disturbed)
    and replayed from then on. ``reset_graph`` drops the graph (after a refit). A capture that fails
    (an engine TensorRT cannot enqueue under capture) is logged and the runner stays on plain
    enqueues."""

    _TORCH_DTYPES = {
        "FLOAT": "float32",
        "HALF": "float16",
        "BF16": "bfloat16",
        "INT32": "int32",
        "INT64": "int64",
        "BOOL": "bool",
        "INT8": "int8",
        "UINT8": "uint8",
    }

    def __init__(self, trt, engine, settings: TensorRTSettings):
        import torch

        self.trt, self.engine, self.settings = trt, engine, settings
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineBuildError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = torch.cuda.Stream()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._shapes: dict | None = None
        self._in: dict = {}
        self._out: dict = {}
        self._graph = None
        self._graph_ok = settings.cuda_graph and settings.fixed_batch
        self.graph_captures = 0
        self.graph_replays = 0

    def _dtype(self, name: str):
        import torch

        dt = self.engine.get_tensor_dtype(name)
        return getattr(torch, self._TORCH_DTYPES[getattr(dt, "name", str(dt).rsplit(".", 1)[-1])])

    def _bind(self, shapes: dict) -> None:
        import torch

        self._graph = None
        for n in self.inputs:
            if not self.context.set_input_shape(n, shapes[n]):
                raise ValueError(f"TensorRT refused shape {list(shapes[n])} for input {n!r} (outside the profile?)")
            self._in[n] = torch.empty(shapes[n], dtype=self._dtype(n), device="cuda")
            self.context.set_tensor_address(n, self._in[n].data_ptr())
        for n in self.outputs:
            self._out[n] = torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtype(n), device="cuda")
            self.context.set_tensor_address(n, self._out[n].data_ptr())
        self._shapes = shapes

    def reset_graph(self) -> None:
        """Forget the captured graph (after a refit): the next run enqueues, then captures again."""
        self._graph = None
        self._graph_ok = self.settings.cuda_graph and self.settings.fixed_batch

    def _capture(self) -> None:
        import torch

        graph = torch.cuda.CUDAGraph()
        try:
            self.stream.synchronize()
            with torch.cuda.stream(self.stream):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    ok = self.context.execute_async_v3(self.stream.cuda_stream)
                finally:
                    graph.capture_end()
            if not ok:
                raise RuntimeError("execute_async_v3 returned False under stream capture")
        except Exception as e:  # noqa: BLE001  not capturable: keep plain enqueues
            self._graph_ok = False
            log.warning("TensorRT enqueue could not be captured as a CUDA graph (%s): plain enqueues", e)
            return
        self._graph = graph
        self.graph_captures += 1

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        shapes = {n: tuple(feeds[n].shape) for n in self.inputs}
        if shapes != self._shapes:
            self._bind(shapes)
        with torch.cuda.stream(self.stream):
            for n in self.inputs:
                self._in[n].copy_(torch.from_numpy(feeds[n]))
            if self._graph is not None:
                self._graph.replay()
                self.graph_replays += 1
            else:
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError("TensorRT execute_async_v3 failed")
                if self._graph_ok:
                    self._capture()  # after this first enqueue at these shapes; replayed from the next run
            out = {n: b.cpu().numpy() for n, b in self._out.items()}  # .cpu() waits for the stream
        return out

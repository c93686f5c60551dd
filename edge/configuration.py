"""``pirl-edge``'s configuration: one draccus dataclass, the way LeRobot's CLIs take theirs.

Every field is a flag (``--link.learner=host:port``, ``--control.hz=30``), a ``--config_path=edge.yaml``
file can hold any of them (flags override it), ``--help`` shows the comment beside each field, and
each group validates its own fields when it is built: a mistake is one ``error:`` line naming the
field, before anything starts. The container entrypoint maps its ``PIRL_*`` variables onto these
fields; docs/configuration.md's tables are generated from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge.backend_choice import BACKENDS
from lerobot_policy_pi_rl.samplers import RL_NOISE_METHODS
from pirl.cli import MetricsConfig, require
from pirl.export.trt_engine import TensorRTSettings

MODES = ("paced", "unpaced")


@dataclass
class LinkConfig:
    """The connection to the learner."""

    # learner address host:port (required)
    learner: str | None = None
    # this robot's id; its entry in tokens is used (required)
    robot_id: str | None = None
    # JSON file {robot_id: token} (required)
    tokens: str | None = None
    # CA certificate that signed the learner's certificate (enables TLS)
    tls_ca: str | None = None
    # client certificate for mutual TLS
    tls_client_cert: str | None = None
    # client private key for mutual TLS
    tls_client_key: str | None = None
    # allow plaintext to a non-loopback learner (refused otherwise)
    insecure: bool = False

    def __post_init__(self):
        for name in ("learner", "robot_id", "tokens"):
            if not getattr(self, name):
                raise ValueError(f"link.{name}: required")
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            raise ValueError("link.tls_client_cert and link.tls_client_key go together")


@dataclass
class PolicyConfig:
    """The policy the edge starts with, and how it samples."""

    # initial policy (a LeRobot pretrained_model dir): version 0 (required)
    path: str | None = None
    # must match the learner's (default: the policy's own)
    noise_method: str | None = None
    # inference backend of the paced loop: auto = TensorRT when tensorrt and CUDA are present, else ONNX
    # Runtime (CUDA provider when available), else PyTorch; a backend that cannot load falls back (logged,
    # counted) to the next; the unpaced simulation loop samples with PyTorch
    backend: str = "auto"
    # compare every newly prepared backend with the PyTorch policy on a fixed input before it serves; a
    # mismatch refuses the version
    golden_check: bool = True
    # torch device of the policy: the torch backend samples there; ONNX Runtime and TensorRT take host inputs
    device: str = "cpu"
    # language instruction for VLA policies (default: the env's task description)
    task: str | None = None

    def __post_init__(self):
        if not self.path:
            raise ValueError("policy.path: required (a LeRobot pretrained_model dir)")
        if self.noise_method is not None and self.noise_method not in RL_NOISE_METHODS:
            raise ValueError(f"policy.noise_method: must be one of {RL_NOISE_METHODS} (got {self.noise_method!r})")
        if self.backend not in BACKENDS:
            raise ValueError(f"policy.backend: must be one of {BACKENDS} (got {self.backend!r})")


@dataclass
class ControlConfig:
    """What the edge drives and for how long."""

    # 'pirl_reach' (the built-in task) or a gymnasium id
    env: str = "pirl_reach"
    # paced: one env at control.hz (a robot); unpaced: control.num_envs simulated envs flat out
    mode: str = "paced"
    # control rate of the paced loop, Hz
    hz: float = 50.0
    # simulated envs of the unpaced mode
    num_envs: int = 64
    # seconds to run (None: until signalled)
    duration_s: float | None = None
    # episodes to run (None: until signalled)
    episodes: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"control.mode: must be one of {MODES} (got {self.mode!r})")
        require(self, "control", at_least={"num_envs": 1, "episodes": 1}, above={"hz": 0, "duration_s": 0})


@dataclass
class SpoolConfig:
    """The on-disk spool of records waiting for upload."""

    # spool directory (default: outputs/edge/<robot_id>/spool)
    dir: str | None = None
    # records the spool holds at most; a full spool refuses new ones (logged, counted), the robot keeps
    # controlling
    max_records: int = 100_000
    # fsync every spooled record (default: on in paced mode, off in unpaced simulation, where records
    # survive an edge crash but not a power loss)
    fsync: bool | None = None
    # seconds to upload the spool at exit
    drain_timeout_s: float = 30.0

    def __post_init__(self):
        require(self, "spool", at_least={"max_records": 1, "drain_timeout_s": 0})


@dataclass
class EdgeConfig:
    """pirl-edge: run a pi_rl policy on a robot or simulated env, record rollouts, sync with the learner.

    pirl-edge --link.learner=127.0.0.1:50051 --link.robot_id=robot-0 --link.tokens=certs/tokens.json
              --link.tls_ca=certs/ca.pem --policy.path=SFT/pretrained_model [--control.mode=paced --control.hz=50]
    """

    # the connection to the learner
    link: LinkConfig = field(default_factory=LinkConfig)
    # the policy the edge starts with, and how it samples
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # what the edge drives and for how long
    control: ControlConfig = field(default_factory=ControlConfig)
    # the on-disk spool of records waiting for upload
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    # write a JSON summary here at exit
    stats_file: str | None = None
    # Prometheus /metrics
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # torch seed and the seed of the envs' resets
    seed: int = 0
    # engines of the TensorRT backend (cache default: outputs/edge/<robot_id>/tensorrt-cache)
    tensorrt: TensorRTSettings = field(default_factory=TensorRTSettings)

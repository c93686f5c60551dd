"""``pirl-edge``'s configuration: one draccus dataclass, the way LeRobot's CLIs take theirs.

Every field is a flag (``--link.learner=host:port``, ``--control.hz=30``), a ``--config_path=edge.yaml``
file can hold any of them (flags override it), ``--help`` shows the comment beside each field, and
each group validates its own fields when it is built: a mistake is one ``error:`` line naming the
field, before anything starts. The container entrypoint maps its ``PIRL_*`` variables onto these
fields; docs/configuration.md's tables are generated from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.envs.configs import EnvConfig
from lerobot.robots.config import RobotConfig
from lerobot.teleoperators.config import TeleoperatorConfig

from edge.backend_choice import BACKENDS
from edge.safety import SafetyConfig
from edge.session_dataset import DatasetConfig
from edge.success_detector import DetectorConfig
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

    # simulation (when no --robot.type or --env.type is given): 'pirl_reach' (the built-in task), a vector env an
    # installed plugin registers (e.g. 'pirl_sim', the simulated robot's task), or a gymnasium id
    env: str = "pirl_reach"
    # keyword arguments of control.env: gymnasium.make's for a gymnasium id (e.g. '{env_name: reach-v3}' for
    # 'metaworld:Meta-World/MT1'), a registered env's or the built-in task's constructor arguments. A LeRobot env
    # type takes its own as --env.<field>
    env_kwargs: dict = field(default_factory=dict)
    # run the simulated envs of a gymnasium id or --env.type in subprocesses (gymnasium's AsyncVectorEnv): for
    # envs slow to build or step in Python, with many unpaced envs
    async_envs: bool = False
    # the info key a simulated env (--env.type or a gymnasium id) reports success under: LeRobot's 'is_success';
    # MetaWorld's gymnasium envs say 'success'
    success_key: str = "is_success"
    # paced: one env or the robot at control.hz; unpaced: control.num_envs simulated envs flat out
    mode: str = "paced"
    # control rate of the paced loop, Hz
    hz: float = 50.0
    # simulated envs of the unpaced mode
    num_envs: int = 64
    # seconds to run (None: until signalled)
    duration_s: float | None = None
    # episodes to run (None: until signalled)
    episodes: int | None = None
    # ticks before a chunk runs out at which the paced loop asks for the next one (None: from the measured
    # inference latency, see docs/runtime.md; 1: at the chunk's last tick, inference gets one tick period)
    lead_ticks: int | None = None
    # the percentile of recent request -> delivery inference latencies that sets the lead (lead_ticks=None)
    lead_percentile: float = 99.0
    # milliseconds added to that percentile: the control thread's own step and wake-up jitter
    lead_margin_ms: float = 5.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"control.mode: must be one of {MODES} (got {self.mode!r})")
        require(
            self,
            "control",
            at_least={"num_envs": 1, "episodes": 1, "lead_ticks": 1, "lead_margin_ms": 0},
            above={"hz": 0, "duration_s": 0},
        )
        if not 0 < self.lead_percentile <= 100:
            raise ValueError(f"control.lead_percentile: must be in (0, 100] (got {self.lead_percentile})")


START_MODES = ("operator", "delay")
OUTCOME_SOURCES = ("robot", "operator", "detector")


@dataclass
class EpisodeConfig:
    """The episode protocol of robot mode (--robot.type=...): reset pose, start, time limit."""

    # pose the robot moves to before and after every episode: action name -> value, e.g.
    # '{shoulder_pan.pos: 0, gripper.pos: 10}' (None: no move; the robot starts where it is)
    reset_pose: dict[str, float] | None = None
    # speed of the moves to and from the reset pose, in the action's units per second
    reset_speed: float = 20.0
    # the reset pose counts as reached when every action value is within this of it
    reset_tolerance: float = 1.0
    # give up on reaching the reset pose after this many seconds (logged, counted) and go on
    reset_timeout_s: float = 10.0
    # how an episode starts: 'operator' (Enter on the edge's terminal, or POST /start on
    # safety.estop_port) or 'delay' (after start_delay_s, time for a person to reset the scene)
    start: str = "operator"
    # seconds between the reset pose and the episode's start when start=delay
    start_delay_s: float = 3.0
    # an episode ends after this many seconds (truncated) unless it ended before
    time_limit_s: float = 30.0
    # who says whether an episode succeeded (its reward: 1 on success, else 0): 'robot' (the robot's own
    # verdict, episode_status(), where it has one: a simulated robot), 'operator' (a person's labels: keys
    # s / f / a, POST /success /failure /abort, a teleoperator's success / failure buttons), 'detector' (the
    # learned success detector at --detector.path; an operator's label still wins). Every episode's last
    # record carries who decided (pirl.v1.EpisodeLabel)
    outcome: str = "robot"
    # a person's reaction time, seconds: their success / failure label judges the macro-step that ran this long
    # before it, which becomes the episode's last record (its reward, its label); the macro-steps after it ran
    # after the outcome was decided and are not sent to the learner (still in the session dataset, counted in
    # pirl_edge_steps_after_label_total). 0: the label lands on the step it was given in. Time your operator: too
    # short leaves a step after the deciding one in each episode (measured: costlier), too long drops the deciding
    # chunk from some
    label_reaction_s: float = 0.0

    def __post_init__(self):
        if self.start not in START_MODES:
            raise ValueError(f"episode.start: must be one of {START_MODES} (got {self.start!r})")
        if self.outcome not in OUTCOME_SOURCES:
            raise ValueError(f"episode.outcome: must be one of {OUTCOME_SOURCES} (got {self.outcome!r})")
        require(
            self,
            "episode",
            at_least={"start_delay_s": 0, "reset_tolerance": 0, "label_reaction_s": 0},
            above={"reset_speed": 0, "reset_timeout_s": 0, "time_limit_s": 0},
        )


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
              [--robot.type=so101_follower --robot.port=/dev/ttyACM0 --robot.id=arm0
               --robot.cameras='{front: {type: opencv, index_or_path: 0, width: 640, height: 480, fps: 30}}']
    """

    # the connection to the learner
    link: LinkConfig = field(default_factory=LinkConfig)
    # the policy the edge starts with, and how it samples
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # a LeRobot robot to drive (--robot.type=so101_follower --robot.port=...; any LeRobot robot type or
    # installed lerobot_robot_* plugin, cameras included): robot mode. None: the simulated env of --env.* or
    # control.env
    robot: RobotConfig | None = None
    # a LeRobot env type to simulate, as lerobot-eval takes it (--env.type=pirl_reach|metaworld|libero|pusht|...
    # --env.task=...; an installed lerobot_env_* plugin's type too), built by LeRobot's env factory with its env
    # processors. None: control.env
    env: EnvConfig | None = None
    # the episode protocol of robot mode
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    # a LeRobot teleoperator a person takes over with (robot mode): --teleop.type=so101_leader
    # --teleop.port=..., gamepad, keyboard_ee, or any lerobot_teleoperator_* plugin. Its actions pass the same
    # safety layer and are recorded as interventions; its success / failure / intervention buttons are operator
    # inputs. None: no interventions
    teleop: TeleoperatorConfig | None = None
    # the learned success detector of episode.outcome=detector (pirl-success train; docs/success_detector.md)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    # the safety layer between the policy and the robot (robot mode; always on there)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    # every robot session recorded as a local LeRobotDataset v3
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
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

    def __post_init__(self):
        if self.env is not None and self.control.env_kwargs:
            raise ValueError(
                f"control.env_kwargs: apply to control.env; env.type={self.env.type} takes its arguments as --env.<field>"
            )
        if self.robot is not None and self.env is not None:
            raise ValueError("env: a robot mode edge drives --robot.type, not a simulated --env.type: give one of them")
        if self.robot is not None and self.control.mode != "paced":
            raise ValueError("control.mode: a robot runs paced (control.mode=unpaced is for simulated envs)")
        if self.robot is None and self.teleop is not None:
            raise ValueError("teleop: a teleoperator takes over a robot: give --robot.type too")
        if self.episode.outcome == "detector" and self.detector.path is None:
            raise ValueError(
                "episode.outcome=detector: give the trained detector, --detector.path=DIR (pirl-success train)"
            )
        if self.detector.path is not None and self.episode.outcome != "detector":
            raise ValueError(
                "detector.path: the detector decides outcomes only with --episode.outcome=detector "
                f"(got episode.outcome={self.episode.outcome})"
            )

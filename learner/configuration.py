"""``pirl-learner``'s configuration: one draccus dataclass, the way LeRobot's CLIs take theirs.

Every field is a flag (``--trainer.episodes_per_update=128``, ``--algorithm.actor_lr=5e-5``), a
``--config_path=run.yaml`` file can hold any of them (flags override it), ``--help`` shows the comment
beside each field, and each group validates its own fields when it is built, so a mistake is one
``error:`` line naming the field before any work starts. The container entrypoint maps its
``PIRL_*`` variables onto these fields; docs/configuration.md's tables are generated from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.envs.configs import EnvConfig

from learner.bc_data import BCSettings, OfflineDatasetConfig
from learner.distributed import DistributedConfig
from learner.store import DEFAULT_MAX_SEQUENCE_AHEAD
from learner.streams import StreamLimits
from learner.trainer import TrainerSettings
from learner.versions import SyncSettings
from lerobot_policy_pi_rl.presets import BuiltinTaskAlgorithmConfig
from lerobot_policy_pi_rl.samplers import RL_NOISE_METHODS
from pirl.cli import MetricsConfig, require
from pirl.export.trt_engine import TensorRTSettings


@dataclass
class ServerConfig:
    """The gRPC service robots connect to."""

    # host:port to listen on (port 0: any free port)
    address: str = "127.0.0.1:50051"
    # write the bound port here once serving (for scripts and tests)
    port_file: str | None = None
    # server certificate (PEM); with tls_key, the service speaks TLS
    tls_cert: str | None = None
    # server private key (PEM)
    tls_key: str | None = None
    # require client certificates signed by this CA (mutual TLS)
    tls_client_ca: str | None = None
    # allow plaintext on a non-loopback address (refused otherwise)
    insecure: bool = False
    # also serve the standard gRPC health service, and nothing else, in plaintext on host:port (for
    # Kubernetes gRPC probes and the container healthcheck, which cannot speak TLS)
    health_address: str | None = None
    # open calls of each streaming RPC (rollouts, policy subscription) one robot may hold; one more is
    # refused, so no robot can take the call slots of the others
    max_streams_per_robot: int = 2
    # close a rollout stream that carried no record for this many seconds (0: never)
    stream_idle_timeout_s: float = 120.0
    # calls the server admits at once (0: sized for the fleet in --tokens: every robot's streams at
    # max_streams_per_robot, plus 8 for Register / Heartbeat / health)
    max_concurrent_calls: int = 0

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("server.tls_cert and server.tls_key go together")
        require(
            self, "server", at_least={"max_streams_per_robot": 1, "stream_idle_timeout_s": 0, "max_concurrent_calls": 0}
        )

    def limits(self) -> StreamLimits:
        return StreamLimits(per_robot=self.max_streams_per_robot, idle_timeout_s=self.stream_idle_timeout_s)


@dataclass
class IntakeConfig:
    """What the learner accepts from robots, and how durably."""

    # size limit of one serialized rollout record, bytes
    max_record_bytes: int = 4 << 20
    # accept records this many policy versions old
    max_version_lag: int = 1
    # refuse a record whose sequence is this far or more above the robot's lowest unacked one (bounds what
    # the learner remembers per robot; the edge keeps such records and registers again)
    max_sequence_ahead: int = DEFAULT_MAX_SEQUENCE_AHEAD
    # fsync every accepted record before acking it (survives a power loss; several ms a record)
    wal_fsync: bool = False

    def __post_init__(self):
        require(self, "intake", at_least={"max_record_bytes": 1, "max_sequence_ahead": 1, "max_version_lag": 0})


@dataclass
class LearnerConfig:
    """pirl-learner: serve pirl.v1.Learner, run PI-RL updates as rollouts arrive, publish every version.

    pirl-learner --policy_path=SFT/pretrained_model --tokens=certs/tokens.json
                 --server.tls_cert=certs/server.pem --server.tls_key=certs/server.key
    pirl-learner --output_dir=outputs/learner --resume=true ...   # continue after a crash
    """

    # SFT checkpoint (a LeRobot pretrained_model dir); not needed with resume when checkpoints exist
    policy_path: str | None = None
    # checkpoints/, write-ahead log, exported versions, status.json
    output_dir: str = "outputs/learner"
    # continue from the newest intact checkpoint in OUTPUT_DIR/checkpoints (each is checked against its
    # manifest of sha256 hashes; refused ones are logged, counted and set aside)
    resume: bool = False
    # JSON file {robot_id: token} of the robots allowed to connect (required)
    tokens: str | None = None
    # torch device of the policy and its PPO updates (cuda for a VLA)
    device: str = "cpu"
    # override the policy's sampler (flow_sde, flow_noise or noise_steer; must match the edges')
    noise_method: str | None = None
    # torch seed
    seed: int = 0
    # the gRPC service robots connect to
    server: ServerConfig = field(default_factory=ServerConfig)
    # what the learner accepts from robots, and how durably
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    # the update loop
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    # how published versions travel to robots (chunked, resumable, hash-checked: docs/runtime.md, Weight sync)
    sync: SyncSettings = field(default_factory=SyncSettings)
    # the env the learner evaluates on, as lerobot-eval takes it: a LeRobot env type (--env.type=pirl_reach,
    # metaworld, libero, ... with --env.task=...; an installed lerobot_env_* plugin's type too). Set, it replaces
    # trainer.eval_env. None: trainer.eval_env
    env: EnvConfig | None = None
    # PPO / GRPO hyperparameters; defaults: the built-in task preset (lerobot_policy_pi_rl/presets.py)
    algorithm: BuiltinTaskAlgorithmConfig = field(default_factory=BuiltinTaskAlgorithmConfig)
    # the BC term's data (algorithm.bc_coef > 0): teleoperator interventions and offline demonstrations
    bc: BCSettings = field(default_factory=BCSettings)
    # offline demonstrations: a local LeRobotDataset, for the BC term, or under a chunk critic (steer_update=q,
    # q_critic_input=action) the first data of its replay (learner/critic_demos.py)
    offline_dataset: OfflineDatasetConfig = field(default_factory=OfflineDatasetConfig)
    # Prometheus /metrics
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # engines built for trainer.export_tensorrt (cache default: OUTPUT_DIR/tensorrt-cache)
    tensorrt: TensorRTSettings = field(default_factory=TensorRTSettings)
    # the learner under torchrun (torchrun --nproc_per_node N --no-python pirl-learner ...): docs/scale.md
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        if not self.tokens:
            raise ValueError("tokens: required (a JSON file {robot_id: token} of the robots allowed to connect)")
        if self.noise_method is not None and self.noise_method not in RL_NOISE_METHODS:
            raise ValueError(f"noise_method: must be one of {RL_NOISE_METHODS} (got {self.noise_method!r})")
        a = self.algorithm
        if self.offline_dataset.root is not None and a.bc_coef <= 0 and not a.chunk_critic:
            raise ValueError(
                "offline_dataset.root: offline demonstrations train through the BC term or a chunk critic: set "
                "--algorithm.bc_coef > 0 (e.g. 0.1), or --noise_method=noise_steer --algorithm.steer_update=q "
                "--algorithm.q_critic_input=action, or leave offline_dataset.root unset"
            )

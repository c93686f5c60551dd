"""Learner Prometheus metrics (prefix pirl_learner_, base units, low-cardinality labels)."""

from prometheus_client import Counter, Gauge, Histogram

from pirl import refusals

LEARNER_ACCEPTED = Counter("pirl_learner_rollouts_accepted_total", "Rollout records accepted", ["robot_id"])
LEARNER_REJECTED = Counter("pirl_learner_rollouts_rejected_total", "Rollout records rejected, by reason", ["reason"])
# every reason the service and the store reject with; exported at 0 from the start so that rate() and
# increase() see the first rejection (a series born at 1 has no increase) and alerts can rely on it
REJECT_REASONS = (
    *refusals.REASONS,
    # an episode's last record without an outcome label while --trainer.require_outcome is on
    *(r for r in ("no_outcome",) if r not in refusals.REASONS),
)
LEARNER_DUPLICATES = Counter("pirl_learner_rollouts_duplicate_total", "Resent records acked again as duplicates")
# set whenever a robot registers, heartbeats, subscribes or streams a record: a stopped edge's own
# /metrics disappears with it, so "sync stale" for a robot that is down is seen from here
LEARNER_ROBOT_LAST_SEEN = Gauge(
    "pirl_learner_robot_last_seen_timestamp_seconds",
    "Unix time of the last authenticated call or record from this robot",
    ["robot_id"],
)
LEARNER_CONNECTED = Gauge("pirl_learner_connected_robots", "Robots with an open rollout stream")
# per-robot stream limits (learner/streams.py): a robot over its limit is refused, the others are not
LEARNER_STREAMS_OPEN = Gauge("pirl_learner_streams_open", "Open long-lived calls, by RPC", ["rpc"])
LEARNER_STREAMS_REFUSED = Counter(
    "pirl_learner_streams_refused_total",
    "Streaming calls refused because the robot already held its per-robot limit",
    ["robot_id", "rpc"],
)
LEARNER_STREAMS_IDLE_CLOSED = Counter(
    "pirl_learner_streams_idle_closed_total",
    "Rollout streams closed by the learner after carrying no record for the idle timeout",
    ["rpc"],
)
LEARNER_VERSION = Gauge("pirl_learner_policy_version", "Current policy version")
LEARNER_UPDATE_SECONDS = Histogram(
    "pirl_learner_update_duration_seconds",
    "Wall time of one PI-RL update",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
LEARNER_PUBLISH_SECONDS = Histogram(
    "pirl_learner_publish_duration_seconds",
    "Export + checkpoint + publish of a new version",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LEARNER_EPISODES_PENDING = Gauge("pirl_learner_episodes_pending", "Complete episodes waiting for the next update")
LEARNER_STALE_EPISODES = Counter("pirl_learner_stale_episodes_total", "Episodes dropped for policy-version lag")
# people in the loop: teleoperator interventions (never PPO samples; BC samples from their first tick) and
# outcome labels (an operator's ABORT drops the whole episode)
LEARNER_INTERVENED_STEPS = Counter(
    "pirl_learner_intervened_steps_total", "Accepted macro-steps a teleoperator drove (left out of the PPO loss)"
)
LEARNER_ABORTED_EPISODES = Counter(
    "pirl_learner_aborted_episodes_total", "Complete episodes an operator aborted (label ABORT): never trained on"
)
BC_SAMPLES = Counter(
    "pirl_learner_bc_samples_total",
    "Samples the BC term trained on, by source (intervention: teleoperated actions; success: the policy's own "
    "successful chunks, bc.successes; offline: --offline_dataset)",
    ["source"],
)
BC_SOURCES = ("intervention", "success", "offline")  # BC_SAMPLES' label values, exported at 0 from the start
BC_BUFFER = Gauge(
    "pirl_learner_bc_intervention_samples", "Samples in the BC buffer (interventions, and successes with bc.successes)"
)
PPO_BC_LOSS = Gauge("pirl_learner_bc_loss", "Flow-matching BC loss of the last update (algorithm.bc_coef > 0)")
STEER_Q_LOSS = Gauge(
    "pirl_learner_steer_q_loss", "steer_update=q: the noise critic's mean squared error on returns-to-go"
)
STEER_HEAD_Q = Gauge("pirl_learner_steer_head_q", "steer_update=q: the critics' minimum Q of the steering head's x_1")
STEER_STD = Gauge("pirl_learner_steer_std", "steer_update=q: the steering head's mean std of x_1 (1: N(0, I))")
STEER_REPLAY = Gauge("pirl_learner_steer_replay_macro_steps", "steer_update=q: steered macro-steps in the replay")
PPO_APPROX_KL = Gauge("pirl_learner_approx_kl", "Approximate KL of the last update")
PPO_CLIP_FRACTION = Gauge("pirl_learner_clip_fraction", "Clip fraction of the last update")
PPO_ENTROPY = Gauge("pirl_learner_entropy", "Mean per-element sampler entropy (Flow-Noise)")
PPO_VALUE_LOSS = Gauge("pirl_learner_value_loss", "Critic loss of the last update")
PPO_EXPLAINED_VARIANCE = Gauge("pirl_learner_explained_variance", "Explained variance of the critic")
PPO_POLICY_LOSS = Gauge("pirl_learner_policy_loss", "Clipped surrogate loss of the last update")
ROLLOUT_SUCCESS = Gauge("pirl_learner_rollout_success_ratio", "Success rate of the episodes in the last batch")
EPISODE_RETURN = Gauge("pirl_learner_episode_return", "Mean episode return of the last batch")
EVAL_SUCCESS = Gauge("pirl_learner_eval_success_ratio", "Deterministic-evaluation success of the current version")
LEARNER_CHECKPOINTS_REFUSED = Counter(
    "pirl_learner_checkpoints_refused_total",
    "Checkpoints refused at --resume (damaged or unloadable; an older one is tried), by reason",
    ["reason"],
)
# every reason learner/checkpoints.py refuses with; exported at 0 from the start like REJECT_REASONS
CHECKPOINT_REFUSE_REASONS = (
    "missing_manifest",
    "bad_manifest",
    "missing_file",
    "unexpected_file",
    "hash_mismatch",
    "load_error",
)

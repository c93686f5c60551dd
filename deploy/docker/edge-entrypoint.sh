#!/usr/bin/env bash
# Entry point of the edge image: runs pirl-edge with flags taken from PIRL_* variables (the
# environment, then $PIRL_CONFIG, default /etc/pirl/edge.env, when that file exists). Arguments
# given to the container are appended, so `docker run IMAGE --control.hz=30` works too.
set -euo pipefail
# shellcheck source=entrypoint-lib.sh source-path=SCRIPTDIR
source "$(dirname "$(readlink -f "$0")")/entrypoint-lib.sh"

usage() {
  cat <<'TEXT'
edge-entrypoint.sh: run pirl-edge configured by environment variables and/or a config file.

  PIRL_CONFIG            KEY=VALUE file read for variables not set in the environment
                         (default /etc/pirl/edge.env, used when it exists)
  PIRL_LEARNER           learner host:port                          (required) --link.learner
  PIRL_ROBOT_ID          this robot's id                            (required) --link.robot_id
  PIRL_TOKENS            tokens JSON holding this robot's token     (required) --link.tokens
  PIRL_POLICY_PATH       initial policy (pretrained_model dir)      (required) --policy.path
  PIRL_TLS_CA            CA of the learner's certificate                       --link.tls_ca
  PIRL_TLS_CLIENT_CERT   / PIRL_TLS_CLIENT_KEY: mutual TLS          --link.tls_client_cert / --link.tls_client_key
  PIRL_INSECURE          1: allow plaintext to a non-loopback learner          --link.insecure
  PIRL_BACKEND           auto | tensorrt | onnxruntime | torch                 --policy.backend
  PIRL_NOISE_METHOD      flow_sde | flow_noise                                 --policy.noise_method
  PIRL_ROBOT_TYPE        a LeRobot robot type or plugin (robot mode)          --robot.type
  PIRL_ROBOT_PORT        the robot's motor bus, e.g. /dev/ttyACM0              --robot.port
  PIRL_ROBOT_CALIBRATION_ID  the robot's calibration id (lerobot-calibrate --robot.id) --robot.id
  PIRL_ROBOT_CAMERAS     cameras, e.g. '{front: {type: opencv, index_or_path: 0, width: 640, height: 480, fps: 30}}' --robot.cameras
  PIRL_ESTOP_PORT        local e-stop / start / end HTTP port (127.0.0.1)      --safety.estop_port
  PIRL_EPISODE_START     operator | delay                                      --episode.start
  PIRL_EPISODE_OUTCOME   robot | operator | detector (who says success)        --episode.outcome
  PIRL_DETECTOR_PATH     a pirl-success train output (outcome detector)        --detector.path
  PIRL_TELEOP_TYPE       a LeRobot teleoperator to take over with              --teleop.type
  PIRL_TELEOP_PORT       the teleoperator's bus, e.g. /dev/ttyACM1             --teleop.port
  PIRL_TELEOP_ID         the teleoperator's calibration id                     --teleop.id
  PIRL_SESSIONS_DIR      where each session's LeRobotDataset goes (a volume)   --dataset.sessions_dir
  PIRL_ENV               simulation: pirl_reach, pirl_sim or a gymnasium id    --control.env
  PIRL_TASK              language instruction for VLA policies                 --policy.task
  PIRL_DEVICE            torch device of the policy (cpu, cuda)                --policy.device
  PIRL_MODE              paced | unpaced                                       --control.mode
  PIRL_CONTROL_HZ        control rate of the paced loop                        --control.hz
  PIRL_NUM_ENVS          envs of the unpaced simulation loop                   --control.num_envs
  PIRL_SPOOL_DIR         rollout spool (a volume)                              --spool.dir
  PIRL_SPOOL_MAX_RECORDS / PIRL_SPOOL_FSYNC                  --spool.max_records / --spool.fsync
  PIRL_TRT_CACHE_DIR     TensorRT engine cache (a volume)                      --tensorrt.cache_dir
  PIRL_METRICS_PORT      Prometheus /metrics port (0: off)                     --metrics.port
  PIRL_METRICS_ADDRESS   address /metrics listens on                           --metrics.address
  PIRL_DURATION / PIRL_EPISODES / PIRL_DRAIN_TIMEOUT    --control.duration_s / --control.episodes / --spool.drain_timeout_s
  PIRL_STATS_FILE / PIRL_SEED                                        --stats_file / --seed
  PIRL_EDGE_ARGS         further pirl-edge flags, verbatim

pirl-edge's own help follows.

TEXT
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exec pirl-edge --help
fi

config=${PIRL_CONFIG:-/etc/pirl/edge.env}
if [[ -n "${PIRL_CONFIG:-}" || -e "$config" ]]; then
  load_config "$config"
fi

require PIRL_LEARNER "the learner's host:port"
require PIRL_ROBOT_ID "this robot's id, as in the tokens file"
require PIRL_TOKENS "path of the tokens JSON holding this robot's token"
require PIRL_POLICY_PATH "path of the initial policy, a LeRobot pretrained_model directory"

opt PIRL_LEARNER --link.learner
opt PIRL_ROBOT_ID --link.robot_id
opt PIRL_TOKENS --link.tokens
opt PIRL_POLICY_PATH --policy.path
opt PIRL_TLS_CA --link.tls_ca
opt PIRL_TLS_CLIENT_CERT --link.tls_client_cert
opt PIRL_TLS_CLIENT_KEY --link.tls_client_key
switch PIRL_INSECURE --link.insecure
opt PIRL_BACKEND --policy.backend
opt PIRL_NOISE_METHOD --policy.noise_method
opt PIRL_ROBOT_TYPE --robot.type
opt PIRL_ROBOT_PORT --robot.port
opt PIRL_ROBOT_CALIBRATION_ID --robot.id
opt PIRL_ROBOT_CAMERAS --robot.cameras
opt PIRL_ESTOP_PORT --safety.estop_port
opt PIRL_EPISODE_START --episode.start
opt PIRL_EPISODE_OUTCOME --episode.outcome
opt PIRL_DETECTOR_PATH --detector.path
opt PIRL_TELEOP_TYPE --teleop.type
opt PIRL_TELEOP_PORT --teleop.port
opt PIRL_TELEOP_ID --teleop.id
opt PIRL_SESSIONS_DIR --dataset.sessions_dir
opt PIRL_ENV --control.env
opt PIRL_TASK --policy.task
opt PIRL_DEVICE --policy.device
opt PIRL_MODE --control.mode
opt PIRL_CONTROL_HZ --control.hz
opt PIRL_NUM_ENVS --control.num_envs
opt PIRL_SPOOL_DIR --spool.dir
opt PIRL_SPOOL_MAX_RECORDS --spool.max_records
switch PIRL_SPOOL_FSYNC --spool.fsync
opt PIRL_TRT_CACHE_DIR --tensorrt.cache_dir
opt PIRL_METRICS_PORT --metrics.port
opt PIRL_METRICS_ADDRESS --metrics.address
opt PIRL_DURATION --control.duration_s
opt PIRL_EPISODES --control.episodes
opt PIRL_DRAIN_TIMEOUT --spool.drain_timeout_s
opt PIRL_STATS_FILE --stats_file
opt PIRL_SEED --seed
extra PIRL_EDGE_ARGS

# exec: pirl-edge becomes the container's main process and gets SIGTERM directly (it then stops
# controlling, uploads what is spooled and exits)
exec pirl-edge "${ARGS[@]}" "$@"

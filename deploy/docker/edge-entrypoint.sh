#!/usr/bin/env bash
# Entry point of the edge image: runs pirl-edge with flags taken from PIRL_* variables (the
# environment, then $PIRL_CONFIG, default /etc/pirl/edge.env, when that file exists). Arguments
# given to the container are appended, so `docker run IMAGE --control-hz 30` works too.
set -euo pipefail
# shellcheck source=entrypoint-lib.sh source-path=SCRIPTDIR
source "$(dirname "$(readlink -f "$0")")/entrypoint-lib.sh"

usage() {
  cat <<'TEXT'
edge-entrypoint.sh: run pirl-edge configured by environment variables and/or a config file.

  PIRL_CONFIG            KEY=VALUE file read for variables not set in the environment
                         (default /etc/pirl/edge.env, used when it exists)
  PIRL_LEARNER           learner host:port                          (required) --learner
  PIRL_ROBOT_ID          this robot's id                            (required) --robot-id
  PIRL_TOKENS            tokens JSON holding this robot's token     (required) --tokens
  PIRL_POLICY_PATH       initial policy (pretrained_model dir)      (required) --policy-path
  PIRL_TLS_CA            CA of the learner's certificate                       --tls-ca
  PIRL_TLS_CLIENT_CERT   / PIRL_TLS_CLIENT_KEY: mutual TLS          --tls-client-cert / --tls-client-key
  PIRL_INSECURE          1: allow plaintext to a non-loopback learner          --insecure
  PIRL_BACKEND           auto | tensorrt | onnxruntime | torch                 --backend
  PIRL_NOISE_METHOD      flow_sde | flow_noise                                 --noise-method
  PIRL_ENV               pirl_reach or a gymnasium id                          --env
  PIRL_TASK              language instruction for VLA policies                 --task
  PIRL_DEVICE            torch device of the policy (cpu, cuda)                --device
  PIRL_MODE              paced | unpaced                                       --mode
  PIRL_CONTROL_HZ        control rate of the paced loop                        --control-hz
  PIRL_NUM_ENVS          envs of the unpaced simulation loop                   --num-envs
  PIRL_SPOOL_DIR         rollout spool (a volume)                              --spool-dir
  PIRL_SPOOL_MAX_RECORDS / PIRL_SPOOL_FSYNC                  --spool-max-records / --spool-fsync
  PIRL_TRT_CACHE_DIR     TensorRT engine cache (a volume)                      --trt-cache-dir
  PIRL_METRICS_PORT      Prometheus /metrics port (0: off)                     --metrics-port
  PIRL_METRICS_ADDRESS   address /metrics listens on                           --metrics-address
  PIRL_DURATION / PIRL_EPISODES / PIRL_DRAIN_TIMEOUT    --duration / --episodes / --drain-timeout
  PIRL_STATS_FILE / PIRL_SEED                                        --stats-file / --seed
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

opt PIRL_LEARNER --learner
opt PIRL_ROBOT_ID --robot-id
opt PIRL_TOKENS --tokens
opt PIRL_POLICY_PATH --policy-path
opt PIRL_TLS_CA --tls-ca
opt PIRL_TLS_CLIENT_CERT --tls-client-cert
opt PIRL_TLS_CLIENT_KEY --tls-client-key
switch PIRL_INSECURE --insecure
opt PIRL_BACKEND --backend
opt PIRL_NOISE_METHOD --noise-method
opt PIRL_ENV --env
opt PIRL_TASK --task
opt PIRL_DEVICE --device
opt PIRL_MODE --mode
opt PIRL_CONTROL_HZ --control-hz
opt PIRL_NUM_ENVS --num-envs
opt PIRL_SPOOL_DIR --spool-dir
opt PIRL_SPOOL_MAX_RECORDS --spool-max-records
opt PIRL_SPOOL_FSYNC --spool-fsync
opt PIRL_TRT_CACHE_DIR --trt-cache-dir
opt PIRL_METRICS_PORT --metrics-port
opt PIRL_METRICS_ADDRESS --metrics-address
opt PIRL_DURATION --duration
opt PIRL_EPISODES --episodes
opt PIRL_DRAIN_TIMEOUT --drain-timeout
opt PIRL_STATS_FILE --stats-file
opt PIRL_SEED --seed
extra PIRL_EDGE_ARGS

# exec: pirl-edge becomes the container's main process and gets SIGTERM directly (it then stops
# controlling, uploads what is spooled and exits)
exec pirl-edge "${ARGS[@]}" "$@"

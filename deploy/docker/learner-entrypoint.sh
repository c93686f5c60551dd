#!/usr/bin/env bash
# Entry point of the learner image: runs pirl-learner with flags taken from PIRL_* variables (the
# environment, then $PIRL_CONFIG, default /etc/pirl/learner.env, when that file exists). Arguments
# given to the container are appended.
set -euo pipefail
# shellcheck source=entrypoint-lib.sh source-path=SCRIPTDIR
source "$(dirname "$(readlink -f "$0")")/entrypoint-lib.sh"

usage() {
  cat <<'TEXT'
learner-entrypoint.sh: run pirl-learner configured by environment variables and/or a config file.

  PIRL_CONFIG              KEY=VALUE file read for variables not set in the environment
                           (default /etc/pirl/learner.env, used when it exists)
  PIRL_TOKENS              tokens JSON of the robots allowed to connect  (required) --tokens
  PIRL_POLICY_PATH         SFT checkpoint to start from (pretrained_model dir)      --policy-path
  PIRL_OUTPUT_DIR          checkpoints, WAL, status (a volume)                      --output-dir
  PIRL_RESUME              1 (default): continue from OUTPUT_DIR's last checkpoint  --resume
  PIRL_ADDRESS             host:port of the gRPC service                            --address
  PIRL_HEALTH_ADDRESS      host:port of the plaintext gRPC health port (probes)     --health-address
  PIRL_TLS_CERT / PIRL_TLS_KEY     server certificate and key           --tls-cert / --tls-key
  PIRL_TLS_CLIENT_CA       require robot certificates signed by this CA             --tls-client-ca
  PIRL_INSECURE            1: allow plaintext on a non-loopback address             --insecure
  PIRL_NOISE_METHOD        flow_sde | flow_noise                                    --noise-method
  PIRL_DEVICE              torch device of the policy and its updates (cuda, cpu)   --device
  PIRL_EPISODES_PER_UPDATE / PIRL_MAX_UPDATES      --episodes-per-update / --max-updates
  PIRL_MAX_VERSION_LAG / PIRL_MAX_RECORD_BYTES     --max-version-lag / --max-record-bytes
  PIRL_WAL_FSYNC           1: fsync every accepted record                           --wal-fsync
  PIRL_MAX_STREAMS_PER_ROBOT   open calls of each streaming RPC per robot     --max-streams-per-robot
  PIRL_STREAM_IDLE_TIMEOUT     close a rollout stream idle this long (s)      --stream-idle-timeout
  PIRL_MAX_CONCURRENT_CALLS    call slots (0: sized for the fleet)            --max-concurrent-calls
  PIRL_MAX_SEQUENCE_AHEAD      refuse sequences this far above the watermark  --max-sequence-ahead
  PIRL_ALGORITHM_CONFIG / PIRL_ACTOR_LR            --algorithm-config / --actor-lr
  PIRL_EVAL_EVERY / PIRL_EVAL_EPISODES / PIRL_TARGET_SUCCESS
                                    --eval-every / --eval-episodes / --target-success
  PIRL_NO_EXPORT_ONNX      1: publish weights only                                  --no-export-onnx
  PIRL_EXPORT_TENSORRT     1: also publish a TensorRT engine of every version       --export-tensorrt
  PIRL_METRICS_PORT        Prometheus /metrics port (0: off)                        --metrics-port
  PIRL_METRICS_ADDRESS     address /metrics listens on                              --metrics-address
  PIRL_PORT_FILE / PIRL_SEED                                         --port-file / --seed
  PIRL_LEARNER_ARGS        further pirl-learner flags, verbatim

pirl-learner's own help follows.

TEXT
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exec pirl-learner --help
fi

config=${PIRL_CONFIG:-/etc/pirl/learner.env}
if [[ -n "${PIRL_CONFIG:-}" || -e "$config" ]]; then
  load_config "$config"
fi

require PIRL_TOKENS "path of the tokens JSON of the robots allowed to connect"
# a restarted container continues where the last one stopped (the learner refuses an output
# directory holding checkpoints without --resume, and starts from PIRL_POLICY_PATH when it has none)
PIRL_RESUME=${PIRL_RESUME:-1}

opt PIRL_TOKENS --tokens
opt PIRL_POLICY_PATH --policy-path
opt PIRL_OUTPUT_DIR --output-dir
switch PIRL_RESUME --resume
opt PIRL_ADDRESS --address
opt PIRL_HEALTH_ADDRESS --health-address
opt PIRL_TLS_CERT --tls-cert
opt PIRL_TLS_KEY --tls-key
opt PIRL_TLS_CLIENT_CA --tls-client-ca
switch PIRL_INSECURE --insecure
opt PIRL_NOISE_METHOD --noise-method
opt PIRL_DEVICE --device
opt PIRL_EPISODES_PER_UPDATE --episodes-per-update
opt PIRL_MAX_UPDATES --max-updates
opt PIRL_MAX_VERSION_LAG --max-version-lag
opt PIRL_MAX_RECORD_BYTES --max-record-bytes
switch PIRL_WAL_FSYNC --wal-fsync
opt PIRL_MAX_STREAMS_PER_ROBOT --max-streams-per-robot
opt PIRL_STREAM_IDLE_TIMEOUT --stream-idle-timeout
opt PIRL_MAX_CONCURRENT_CALLS --max-concurrent-calls
opt PIRL_MAX_SEQUENCE_AHEAD --max-sequence-ahead
opt PIRL_ALGORITHM_CONFIG --algorithm-config
opt PIRL_ACTOR_LR --actor-lr
opt PIRL_EVAL_EVERY --eval-every
opt PIRL_EVAL_EPISODES --eval-episodes
opt PIRL_TARGET_SUCCESS --target-success
switch PIRL_NO_EXPORT_ONNX --no-export-onnx
switch PIRL_EXPORT_TENSORRT --export-tensorrt
opt PIRL_METRICS_PORT --metrics-port
opt PIRL_METRICS_ADDRESS --metrics-address
opt PIRL_PORT_FILE --port-file
opt PIRL_SEED --seed
extra PIRL_LEARNER_ARGS

exec pirl-learner "${ARGS[@]}" "$@"

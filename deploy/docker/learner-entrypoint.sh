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
  PIRL_POLICY_PATH         SFT checkpoint to start from (pretrained_model dir)      --policy_path
  PIRL_OUTPUT_DIR          checkpoints, WAL, status (a volume)                      --output_dir
  PIRL_RESUME              1 (default): continue from OUTPUT_DIR's last checkpoint  --resume
  PIRL_ADDRESS             host:port of the gRPC service                            --server.address
  PIRL_HEALTH_ADDRESS      host:port of the plaintext gRPC health port (probes)     --server.health_address
  PIRL_TLS_CERT / PIRL_TLS_KEY     server certificate and key           --server.tls_cert / --server.tls_key
  PIRL_TLS_CLIENT_CA       require robot certificates signed by this CA             --server.tls_client_ca
  PIRL_INSECURE            1: allow plaintext on a non-loopback address             --server.insecure
  PIRL_NOISE_METHOD        flow_sde | flow_noise                                    --noise_method
  PIRL_DEVICE              torch device of the policy and its updates (cuda, cpu)   --device
  PIRL_EPISODES_PER_UPDATE / PIRL_MAX_UPDATES      --trainer.episodes_per_update / --trainer.max_updates
  PIRL_MAX_VERSION_LAG / PIRL_MAX_RECORD_BYTES     --intake.max_version_lag / --intake.max_record_bytes
  PIRL_WAL_FSYNC           1: fsync every accepted record                           --intake.wal_fsync
  PIRL_MAX_STREAMS_PER_ROBOT   open calls of each streaming RPC per robot     --server.max_streams_per_robot
  PIRL_STREAM_IDLE_TIMEOUT     close a rollout stream idle this long (s)      --server.stream_idle_timeout_s
  PIRL_MAX_CONCURRENT_CALLS    call slots (0: sized for the fleet)            --server.max_concurrent_calls
  PIRL_MAX_SEQUENCE_AHEAD      refuse sequences this far above the watermark  --intake.max_sequence_ahead
  PIRL_CONFIG_PATH         YAML of any pirl-learner fields (flags override it)   --config_path
  PIRL_ACTOR_LR            actor learning rate                                    --algorithm.actor_lr
  PIRL_EVAL_EVERY / PIRL_EVAL_EPISODES / PIRL_TARGET_SUCCESS
                    --trainer.eval_every / --trainer.eval_episodes / --trainer.target_success
  PIRL_NO_EXPORT_ONNX      1: publish weights only                                  --trainer.export_onnx=false
  PIRL_EXPORT_TENSORRT     1: also publish a TensorRT engine of every version       --trainer.export_tensorrt
  PIRL_METRICS_PORT        Prometheus /metrics port (0: off)                        --metrics.port
  PIRL_METRICS_ADDRESS     address /metrics listens on                              --metrics.address
  PIRL_PORT_FILE / PIRL_SEED                                         --server.port_file / --seed
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
opt PIRL_POLICY_PATH --policy_path
opt PIRL_OUTPUT_DIR --output_dir
switch PIRL_RESUME --resume
opt PIRL_ADDRESS --server.address
opt PIRL_HEALTH_ADDRESS --server.health_address
opt PIRL_TLS_CERT --server.tls_cert
opt PIRL_TLS_KEY --server.tls_key
opt PIRL_TLS_CLIENT_CA --server.tls_client_ca
switch PIRL_INSECURE --server.insecure
opt PIRL_NOISE_METHOD --noise_method
opt PIRL_DEVICE --device
opt PIRL_EPISODES_PER_UPDATE --trainer.episodes_per_update
opt PIRL_MAX_UPDATES --trainer.max_updates
opt PIRL_MAX_VERSION_LAG --intake.max_version_lag
opt PIRL_MAX_RECORD_BYTES --intake.max_record_bytes
switch PIRL_WAL_FSYNC --intake.wal_fsync
opt PIRL_MAX_STREAMS_PER_ROBOT --server.max_streams_per_robot
opt PIRL_STREAM_IDLE_TIMEOUT --server.stream_idle_timeout_s
opt PIRL_MAX_CONCURRENT_CALLS --server.max_concurrent_calls
opt PIRL_MAX_SEQUENCE_AHEAD --intake.max_sequence_ahead
opt PIRL_CONFIG_PATH --config_path
opt PIRL_ACTOR_LR --algorithm.actor_lr
opt PIRL_EVAL_EVERY --trainer.eval_every
opt PIRL_EVAL_EPISODES --trainer.eval_episodes
opt PIRL_TARGET_SUCCESS --trainer.target_success
switch_not PIRL_NO_EXPORT_ONNX --trainer.export_onnx
switch PIRL_EXPORT_TENSORRT --trainer.export_tensorrt
opt PIRL_METRICS_PORT --metrics.port
opt PIRL_METRICS_ADDRESS --metrics.address
opt PIRL_PORT_FILE --server.port_file
opt PIRL_SEED --seed
extra PIRL_LEARNER_ARGS

exec pirl-learner "${ARGS[@]}" "$@"

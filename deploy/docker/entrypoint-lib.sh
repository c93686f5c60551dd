# shellcheck shell=bash
# Shared by edge-entrypoint.sh and learner-entrypoint.sh (sourced, not run): configuration from
# PIRL_* environment variables and an optional KEY=VALUE file, turned into command-line flags.

# load_config FILE: export each PIRL_NAME=value line of FILE whose variable is not already set, so
# the environment (docker -e, compose environment:, Kubernetes env) overrides the file. The file is
# parsed, never executed: no shell expansion; one pair of surrounding quotes is removed.
load_config() {
  local file=$1 line key value n=0
  [[ -r "$file" ]] || die "config file $file is not readable"
  while IFS= read -r line || [[ -n "$line" ]]; do
    n=$((n + 1))
    line="${line%$'\r'}"
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    if [[ ! "$line" =~ ^[[:space:]]*(PIRL_[A-Z0-9_]+)=(.*)$ ]]; then
      die "$file:$n: expected PIRL_NAME=value, got: $line"
    fi
    key=${BASH_REMATCH[1]}
    value=${BASH_REMATCH[2]}
    if [[ "$value" =~ ^\"(.*)\"$ || "$value" =~ ^\'(.*)\'$ ]]; then
      value=${BASH_REMATCH[1]}
    fi
    if [[ -z "${!key+set}" ]]; then
      export "$key=$value"
    fi
  done < "$file"
}

die() {
  echo "error: $*" >&2
  exit 2
}

# ARGS collects the flags; opt VAR --flag adds "--flag value" when VAR is set and not empty
ARGS=()
opt() {
  local value=${!1:-}
  if [[ -n "$value" ]]; then
    ARGS+=("$2" "$value")
  fi
}

# switch VAR --flag adds "--flag=true" when VAR is 1/true/yes/on and "--flag=false" when it is
# 0/false/no/off (the programs' boolean fields take a value); empty adds nothing (the default)
switch() {
  case "${!1:-}" in
    1 | true | yes | on) ARGS+=("$2=true") ;;
    0 | false | no | off) ARGS+=("$2=false") ;;
    "") ;;
    *) die "$1 must be 1/true/yes/on or 0/false/no/off, got '${!1}'" ;;
  esac
}

# switch_not VAR --flag: the opposite (VAR=1 sets the field false), for variables named PIRL_NO_*
switch_not() {
  case "${!1:-}" in
    1 | true | yes | on) ARGS+=("$2=false") ;;
    0 | false | no | off) ARGS+=("$2=true") ;;
    "") ;;
    *) die "$1 must be 1/true/yes/on or 0/false/no/off, got '${!1}'" ;;
  esac
}

require() {
  [[ -n "${!1:-}" ]] || die "$1 is not set ($2)"
}

# extra VAR: flags given verbatim in VAR (split on whitespace, no globbing)
extra() {
  local words=()
  read -r -a words <<< "${!1:-}"
  ARGS+=("${words[@]}")
}

# PI-RL for LeRobot. `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= outputs/demo

# Python >= 3.12 (lerobot 0.6.1 needs it): $PYTHON if set, else python3.12 / python3 on PATH,
# else the newest 3.12+ under pyenv (where these machines install it, off PATH).
FIND_PYTHON = for c in "$$PYTHON" python3.12 python3; do \
	  [ -n "$$c" ] && command -v "$$c" >/dev/null 2>&1 && "$$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { command -v "$$c"; exit 0; }; \
	done; \
	root=$$(pyenv root 2>/dev/null || echo "$$HOME/.pyenv"); \
	for c in $$(ls -d "$$root"/versions/3.12*/bin/python3 2>/dev/null | sort -V -r) $$(ls -d "$$root"/versions/3.1[3-9]*/bin/python3 2>/dev/null | sort -V); do "$$c" -c '' && { echo "$$c"; exit 0; }; done; \
	exit 1

.PHONY: demo test test-fast lint format docs venv sft proto certs clean help which-python deploy-tools deploy-render deploy-check sim-tools gpu-check gpu-wheels

which-python:
	@$(FIND_PYTHON)

help:
	@echo "make demo   - set up .venv and run the main job (pirl-demo) on the built-in task -> $(OUT)"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make test-fast - the tests that start no process (-m 'not slow'), for the edit-test loop"
	@echo "make lint   - ruff check (LeRobot's rule set, from pyproject.toml) and ruff format --check"
	@echo "make format - ruff check --fix and ruff format over the tree"
	@echo "make docs   - regenerate docs/configuration.md's field tables from the comments beside the fields"
	@echo "make sft    - record scripted demos and behaviour-clone the pi_rl policy (pirl-sft)"
	@echo "make proto  - regenerate pirl/v1/*_pb2*.py from the IDL proto/pirl/v1/pirl.proto"
	@echo "make certs  - a local CA, learner and robot certificates and tokens in certs/ (pirl-certs)"
	@echo "make deploy-tools  - install promtool/prometheus (Debian package, as root) for the deployment tests"
	@echo "make deploy-render - regenerate dashboards JSON, PrometheusRule and dashboard ConfigMaps (deploy/render.py)"
	@echo "make deploy-check  - hadolint, shellcheck, kustomize + schema validation, promtool, compose schema, pirl-flash"
	@echo "make gpu-check  - on a bare GPU box (no venv, only PyTorch + wheels/gpu-check): real-size VLA latency and PPO -> $(GPU_OUT)/gpu_check.json"
	@echo "make gpu-wheels - download the wheels gpu-check needs into $(GPU_WHEELS), print their size, fail over 64 MiB"

$(VENV)/.installed: pyproject.toml sim/pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  py=$$( $(FIND_PYTHON) ) || { echo "error: Python >= 3.12 not found (set PYTHON=/path/to/python3.12)" >&2; exit 1; }; \
	  echo "creating $(VENV) with $$py"; "$$py" -m venv $(VENV); \
	fi
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e '.[test]' -e ./sim
	@$(MAKE) --no-print-directory sim-tools
	touch $@

# the simulated robot (sim/, lerobot_robot_pirl_sim) renders its cameras offscreen with MuJoCo on the
# CPU: EGL with Mesa's software driver (or OSMesa). Installed when missing and we are root with apt-get
# (CI, containers); otherwise a note: set MUJOCO_GL=osmesa or install them yourself.
SIM_GL_PACKAGES = libegl1 libegl-mesa0 libgl1-mesa-dri libosmesa6
sim-tools:
	@if ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' && ldconfig -p 2>/dev/null | grep -q 'libOSMesa.so'; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $(SIM_GL_PACKAGES) (offscreen rendering of the simulated robot's cameras)"; \
	  (apt-get install -y -qq --no-install-recommends $(SIM_GL_PACKAGES) >/dev/null 2>&1 || \
	   (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SIM_GL_PACKAGES) >/dev/null)); \
	else echo "note: EGL / OSMesa not found (apt-get install $(SIM_GL_PACKAGES)): the simulated robot cannot render its cameras"; fi

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/pirl-demo --out $(OUT)

sft: $(VENV)/.installed
	$(VENV)/bin/pirl-sft --out outputs/sft

proto: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/pirl/v1/pirl.proto

certs: $(VENV)/.installed
	$(VENV)/bin/pirl-certs --out certs --robots robot-0 robot-1

# promtool and prometheus (Debian's `prometheus`) for the deployment tests: installed when missing and
# we are root with apt-get (CI, containers); otherwise a note, and those tests skip unless
# PIRL_REQUIRE_DEPLOY_TOOLS=1 (set by .ci/run) makes them fail. The Python tools come with '.[test]'.
deploy-tools:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's prometheus (promtool, prometheus) for the deployment tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else echo "note: promtool/prometheus not found (apt-get install prometheus): the deployment tests that need them skip"; fi

deploy-render: $(VENV)/.installed
	$(PY) deploy/render.py

deploy-check: $(VENV)/.installed deploy-tools
	$(PY) -m pytest -q tests/deploy/test_deploy_static.py tests/deploy/test_deploy_flash.py

test: $(VENV)/.installed deploy-tools
	$(PY) -m pytest -q

# the tests that start no process and no fresh interpreter (about 6-7 minutes on 2 cores, against 30-35 for all); CI runs `make test`
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

docs: $(VENV)/.installed
	$(PY) -m pirl_tools.config_docs

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The GPU check (docs/gpu_check.md) runs on a bare GPU box with the box's own Python (only PyTorch there) and no
# venv: the wheels `make gpu-wheels` put in $(GPU_WHEELS) fill in what it lacks (pip keeps what is installed), and
# `timeout` holds it to 8 minutes (the JSON is rewritten after every part, so a kill still leaves the figures).
GPU_PYTHON ?= python3
GPU_WHEELS ?= wheels/gpu-check
GPU_OUT ?= outputs/gpu_check
GPU_ARGS ?=
GPU_WHEELS_ARGS ?=
gpu-check:
	@if [ -f $(GPU_WHEELS)/requirements.txt ]; then \
	  echo "installing what $(GPU_PYTHON) lacks from $(GPU_WHEELS)"; \
	  PIP_BREAK_SYSTEM_PACKAGES=1 $(GPU_PYTHON) -m pip install -q --no-index --no-deps --find-links $(GPU_WHEELS) -r $(GPU_WHEELS)/requirements.txt; \
	else echo "note: no $(GPU_WHEELS)/requirements.txt (make gpu-wheels builds it): using what $(GPU_PYTHON) has"; fi
	PYTHONPATH=. HF_HUB_OFFLINE=1 timeout 480 $(GPU_PYTHON) -m pirl_tools.gpu_check --out=$(GPU_OUT) $(GPU_ARGS)

gpu-wheels: $(VENV)/.installed
	$(PY) -m pirl_tools.gpu_check wheels --dest=$(GPU_WHEELS) $(GPU_WHEELS_ARGS)

clean:
	rm -rf outputs .pytest_cache

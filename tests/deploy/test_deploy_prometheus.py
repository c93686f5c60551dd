"""A real Prometheus server (Debian's `prometheus`) on loopback scrapes a real learner and three edges
with the shipped recording and alert rules loaded. Every metric the dashboards and alerts read is
in the scraped data, every dashboard query evaluates (with data) on that server, every rule
evaluates without error, and stopping an edge makes the sync-stale alert fire for that robot only
(from the learner's side: the stopped edge's own /metrics is gone).

The third edge drives a robot (robot mode, behind the safety layer): a test robot plugin whose arm
never moves, so every move to the reset pose times out, with tight action bounds and a jump limit, so
commands are clamped and limited; the test e-stops it (SIGUSR1) once it has run episodes, so the
e-stop series exist and PirlEdgeEStopLatched is raised for that robot only.

The only change to the shipped rules: the sync-stale threshold and `for` are shortened (120 s / 1 m
to 15 s / 2 s) so the test takes seconds, not minutes; promtool tests the real numbers.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

import helpers.promql as promql_names
from helpers.deploy import BIN, Processes, make_checkpoint, process_env, require_tool, wait_until
from helpers.net import free_port
from helpers.plugin_dist import install_dist
from pirl.security import make_dev_pki

pytestmark = pytest.mark.slow  # a real Prometheus scraping real processes

STALE_AFTER_S = 15
ROBOT = "robot-2"  # the edge in robot mode

# A LeRobot robot plugin (found by its distribution name, as one from PyPI would be): six float
# observations, three of them the positions of its three actions, which never move.
STUCKARM = """
from dataclasses import dataclass

from lerobot.robots.config import RobotConfig
from lerobot.robots.robot import Robot

ACTIONS = ["a.pos", "b.pos", "c.pos"]
STATE = ACTIONS + ["load", "temperature", "voltage"]


@RobotConfig.register_subclass("stuckarm")
@dataclass
class StuckArmConfig(RobotConfig):
    pass


class StuckArm(Robot):
    config_class = StuckArmConfig
    name = "stuckarm"

    def __init__(self, config):
        super().__init__(config)
        self._connected = False

    @property
    def observation_features(self):
        return dict.fromkeys(STATE, float)

    @property
    def action_features(self):
        return dict.fromkeys(ACTIONS, float)

    @property
    def is_connected(self):
        return self._connected

    def connect(self, calibrate=True):
        self._connected = True

    @property
    def is_calibrated(self):
        return True

    def calibrate(self):
        pass

    def configure(self):
        pass

    def get_observation(self):
        return dict.fromkeys(STATE, 0.0)

    def send_action(self, action):
        return action

    def disconnect(self):
        self._connected = False
"""


def install_stuckarm(root: Path) -> Path:
    """The ``lerobot_robot_stuckarm`` distribution under ``root``; returns the directory for PYTHONPATH."""
    return install_dist(root, "lerobot_robot_stuckarm", STUCKARM)


def shortened_rules(dst: Path) -> list[Path]:
    """The shipped rule files, with only PirlEdgeSyncStale's threshold and `for` shortened."""
    out = []
    for path in promql_names.RULES:
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == "PirlEdgeSyncStale":
                    assert rule["expr"].count("> 120") == 2 and rule["for"] == "1m", rule  # the shipped numbers
                    rule["expr"] = rule["expr"].replace("> 120", f"> {STALE_AFTER_S}")
                    rule["for"] = "2s"
        out.append(dst / path.name)
        out[-1].write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


class Prom:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}" if params else f"{self.base}{path}"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:  # a bad query answers 400 with its error in the body
            return json.loads(e.read())

    def query(self, expr: str) -> dict:
        return self.get("/api/v1/query", query=expr)

    def active(self, name: str) -> list[dict]:
        return [a for a in self.get("/api/v1/alerts")["data"]["alerts"] if a["labels"]["alertname"] == name]

    def alerts(self, name: str) -> dict[str, str]:
        """robot_id (or '') -> state of the active alerts called ``name``."""
        return {a["labels"].get("robot_id", ""): a["state"] for a in self.active(name)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    prometheus = require_tool("prometheus", "apt-get install prometheus (Debian), or run `make deploy-tools` as root")
    root = tmp_path_factory.mktemp("prometheus-stack")
    ckpt = make_checkpoint(root)
    pki = make_dev_pki(root / "certs", ["robot-0", "robot-1", ROBOT])
    grpc_port, prom_port = free_port(), free_port()
    metrics = {"learner": free_port(), "robot-0": free_port(), "robot-1": free_port(), ROBOT: free_port()}
    procs = Processes(root / "logs")
    common = [
        "--link.learner",
        f"127.0.0.1:{grpc_port}",
        "--link.tokens",
        str(pki["tokens"]),
        "--link.tls_ca",
        str(pki["ca_cert"]),
        "--policy.path",
        str(ckpt),
        "--spool.drain_timeout_s",
        "30",
    ]
    try:
        procs.start(
            "learner",
            [
                str(BIN / "pirl-learner"),
                "--policy_path",
                str(ckpt),
                "--output_dir",
                str(root / "learner"),
                "--server.address",
                f"127.0.0.1:{grpc_port}",
                "--tokens",
                str(pki["tokens"]),
                "--server.tls_cert",
                str(pki["server_cert"]),
                "--server.tls_key",
                str(pki["server_key"]),
                "--trainer.episodes_per_update",
                "16",
                "--trainer.max_updates",
                "2",
                "--trainer.eval_every",
                "0",
                "--intake.max_version_lag",
                "5",
                "--metrics.port",
                str(metrics["learner"]),
            ],
            process_env(),
        )
        # robot-0: a paced robot that asked for TensorRT (not here: it falls back, and says so);
        # robot-1: a simulation farm, the one the test stops
        procs.start(
            "robot-0",
            [
                str(BIN / "pirl-edge"),
                *common,
                "--link.robot_id",
                "robot-0",
                "--control.mode",
                "paced",
                "--control.hz",
                "50",
                "--policy.backend",
                "tensorrt",
                "--spool.dir",
                str(root / "spool-0"),
                "--metrics.port",
                str(metrics["robot-0"]),
            ],
            process_env(),
        )
        procs.start(
            "robot-1",
            [
                str(BIN / "pirl-edge"),
                *common,
                "--link.robot_id",
                "robot-1",
                "--control.mode",
                "unpaced",
                "--control.num_envs",
                "8",
                "--spool.dir",
                str(root / "spool-1"),
                "--metrics.port",
                str(metrics["robot-1"]),
            ],
            process_env(),
        )
        # robot-2: a robot (the stuck arm) behind the safety layer, episodes of 0.5 s, its session recorded
        site = install_stuckarm(root / "plugin")
        procs.start(
            ROBOT,
            [
                str(BIN / "pirl-edge"),
                *common,
                "--link.robot_id",
                ROBOT,
                "--robot.type=stuckarm",
                "--control.hz=50",
                "--episode.start=delay",
                "--episode.start_delay_s=0.1",
                "--episode.time_limit_s=0.5",
                "--episode.reset_pose={a.pos: 0.03, b.pos: 0.03, c.pos: 0.03}",
                "--episode.reset_tolerance=0.01",
                "--episode.reset_timeout_s=0.3",
                "--safety.action_min=[-0.05,-0.05,-0.05]",
                "--safety.action_max=[0.05,0.05,0.05]",
                "--safety.max_delta=0.01",
                "--dataset.video=false",
                f"--dataset.root={root / 'session-2'}",
                "--spool.dir",
                str(root / "spool-2"),
                "--metrics.port",
                str(metrics[ROBOT]),
            ],
            process_env(PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))),
        )
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in shortened_rules(root)],
            "scrape_configs": [
                {"job_name": "pirl-learner", "static_configs": [{"targets": [f"127.0.0.1:{metrics['learner']}"]}]},
                {
                    "job_name": "pirl-edge",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{metrics[name]}" for name in ("robot-0", "robot-1", ROBOT)]}
                    ],
                },
            ],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        procs.start(
            "prometheus",
            [
                prometheus,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            process_env(),
        )
        prom = Prom(prom_port)

        def all_alive():
            for name in procs.procs:
                procs.alive(name)

        def ready():
            try:
                return urllib.request.urlopen(f"{prom.base}/-/ready", timeout=5).status == 200
            except OSError:
                return False

        wait_until(ready, 60, "Prometheus ready", check=all_alive)
        # learner at version >= 1 and every robot serving it: every histogram has observations
        wait_until(
            lambda: prom.query("min(pirl_edge_policy_version) >= 1 and on() count(pirl_edge_policy_version) == 3")[
                "data"
            ]["result"],
            240,
            "all three robots on policy version 1",
            check=all_alive,
        )
        wait_until(lambda: prom.query('count(up{job=~"pirl-.*"} == 1) == 4')["data"]["result"], 30, "4 targets up")
        # the robot ran episodes (its reset moves time out), then an operator e-stops it
        robot = f'{{robot_id="{ROBOT}"}}'
        wait_until(
            lambda: prom.query(f"pirl_edge_reset_timeouts_total{robot} and on () pirl_edge_episodes_total{robot}")[
                "data"
            ]["result"],
            60,
            f"{ROBOT}'s episodes and reset timeouts scraped",
            check=all_alive,
        )
        procs.procs[ROBOT].send_signal(signal.SIGUSR1)
        wait_until(
            lambda: prom.query(
                f"pirl_edge_safety_estop_latched{robot} == 1 and on () pirl_edge_safety_estop_actions_total{robot}"
            )["data"]["result"],
            30,
            f"{ROBOT}'s e-stop latched and applied",
            check=all_alive,
        )
        time.sleep(5)  # a few more scrapes and rule evaluations over the running system
        yield prom, procs
    finally:
        procs.close()


def test_every_metric_the_dashboards_and_alerts_use_is_in_the_scraped_data(stack):
    prom, _ = stack
    scraped = set(prom.get("/api/v1/label/__name__/values")["data"])
    used = promql_names.used_names()
    raw = {n for n in used if ":" not in n}
    assert raw and not raw - scraped, f"used by dashboards/alerts but not scraped: {sorted(raw - scraped)}"
    recorded = promql_names.recorded_names()
    assert {n for n in used if ":" in n} <= recorded  # every level:metric:op name read is one we record
    missing = {n for n in recorded if not prom.query(n)["data"]["result"]}
    assert not missing, f"recording rules that produced nothing: {sorted(missing)}"
    assert prom.query('up{job="pirl-learner"} == 1')["data"]["result"]  # what PirlLearnerDown reads


def test_every_rule_evaluates_without_error(stack):
    prom, _ = stack
    groups = prom.get("/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(promql_names.rules())
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad


def test_every_dashboard_query_evaluates_with_data(stack):
    prom, _ = stack
    end = time.time()
    failures = []
    for dashboard, title, expr in promql_names.dashboard_queries():
        q = promql_names.instant(expr)
        instant = prom.query(q)
        ranged = prom.get("/api/v1/query_range", query=q, start=end - 60, end=end, step=5)
        if instant.get("status") != "success" or ranged.get("status") != "success":
            failures.append((dashboard, title, q, instant.get("error") or ranged.get("error")))
        elif not instant["data"]["result"]:
            failures.append((dashboard, title, q, "no data"))
    assert not failures, "\n".join(map(str, failures))


def test_tensorrt_fallback_alert_is_raised_for_the_robot_that_asked_for_tensorrt(stack):
    prom, _ = stack
    states = wait_until(lambda: prom.alerts("PirlEdgeBackendFellBackFromTensorRT"), 30, "the fallback alert")
    assert set(states) == {"robot-0"} and states["robot-0"] in ("pending", "firing")


def test_the_estop_latched_alert_is_raised_for_the_robot_that_was_estopped(stack):
    prom, _ = stack
    states = wait_until(lambda: prom.alerts("PirlEdgeEStopLatched"), 30, "the e-stop alert")
    assert set(states) == {ROBOT} and states[ROBOT] in ("pending", "firing")
    # what the SIGUSR1 e-stop left: its source, the hold the robot took, the episode it ended, the phase
    robot = f'{{robot_id="{ROBOT}"}}'
    assert prom.query(
        f'robot_id_source:pirl_edge_safety_estops:increase1h{{robot_id="{ROBOT}",source="sigusr1"}} == 1'
    )["data"]["result"]
    assert prom.query(f'pirl_edge_safety_estop_actions_total{{robot_id="{ROBOT}",action="hold"}} == 1')["data"][
        "result"
    ]
    assert prom.query(f'pirl_edge_episode_phase{{robot_id="{ROBOT}",phase="estop"}} == 1')["data"]["result"]
    # the stuck arm's reset moves timed out; the tight bounds clamped the policy's commands
    assert prom.query(f"robot_id:pirl_edge_reset_timeouts:increase1h{robot} >= 1")["data"]["result"]
    assert prom.query(f"pirl_edge_safety_clamped_ticks_total{robot} > 0")["data"]["result"]
    assert prom.alerts("PirlEdgeEStopActionFailed") == {}  # the hold was taken


def test_stopping_an_edge_makes_sync_stale_fire_for_that_robot_only(stack):
    prom, procs = stack
    assert prom.alerts("PirlEdgeSyncStale") == {}  # both robots in contact before the stop
    assert procs.stop("robot-1") == 0, procs.log("robot-1")
    states = wait_until(
        lambda: prom.alerts("PirlEdgeSyncStale").get("robot-1") == "firing" and prom.alerts("PirlEdgeSyncStale"),
        90,
        "PirlEdgeSyncStale firing for robot-1",
        check=lambda: procs.alive("learner"),
    )
    assert states == {"robot-1": "firing"}  # robot-0 keeps syncing
    # the alert's value is the seconds since robot-1's last contact, past the threshold (that contact
    # may predate the stop by up to a heartbeat period, so wall time since the stop is not the measure)
    (alert,) = prom.active("PirlEdgeSyncStale")
    assert float(alert["value"]) > STALE_AFTER_S
    # the stopped edge's own gauge is gone: the learner's last-seen is what fired
    assert not prom.query('pirl_edge_seconds_since_last_sync{robot_id="robot-1"}')["data"]["result"]
    assert prom.query(
        f'time() - pirl_learner_robot_last_seen_timestamp_seconds{{robot_id="robot-1"}} > {STALE_AFTER_S}'
    )["data"]["result"]

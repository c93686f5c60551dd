"""The safety layer between the policy and a robot: bounds, jump limit, hold, e-stop from every source,
watchdog. A fake paced loop drives a fake LeRobot-style robot the way the edge does, so the e-stop is
checked where it matters: what reaches ``send_action``."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from edge.operator_inputs import OperatorInputs
from edge.safety import (
    ActionBounds,
    EStop,
    EStopResponder,
    SafetyConfig,
    SafetyLayer,
    Watchdog,
    apply_estop_action,
    as_robot_action,
    bounds_from_stats,
    from_robot_action,
    install_sigusr1,
    positions_from_observation,
    resolve_bounds,
    robot_action_limits,
)
from helpers.net import free_port
from pirl.cli import parse_config

NAMES = ["shoulder_pan.pos", "elbow_flex.pos", "gripper.pos"]
BOUNDS = ActionBounds(np.array([-1, -1, 0], np.float32), np.array([1, 1, 1], np.float32), "config")


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------------------------- config


@dataclass
class _EdgeLike:
    safety: SafetyConfig = field(default_factory=SafetyConfig)


def test_config_defaults_validate_and_parse_from_flags():
    cfg = SafetyConfig()
    assert cfg.estop_action == "hold" and cfg.watchdog_s > 0 and not cfg.allow_missing_bounds
    parsed = parse_config(
        _EdgeLike,
        prog="t",
        args=["--safety.max_delta=0.05", "--safety.action_min=[-1,-2]", "--safety.action_max=[1,2]"],
    )
    assert parsed.safety.max_delta == 0.05 and parsed.safety.action_min == [-1.0, -2.0]
    assert parse_config(_EdgeLike, prog="t", args=["--safety.max_delta=[0.1,0.2]"]).safety.max_delta == [0.1, 0.2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"action_min": [0.0]}, "safety.action_min and safety.action_max go together"),
        ({"action_min": [0.0, 1.0], "action_max": [1.0]}, "safety.action_min / safety.action_max: 2 and 1"),
        ({"action_min": [0.0, 2.0], "action_max": [1.0, 1.0]}, "safety.action_min: above safety.action_max at dim 1"),
        ({"action_min": [float("nan")], "action_max": [1.0]}, "safety.action_min: must be finite"),
        ({"bounds_margin": -0.1}, "safety.bounds_margin: must be >= 0"),
        ({"max_delta": 0.0}, "safety.max_delta: must be > 0"),
        ({"max_delta": [0.1, -1.0]}, "safety.max_delta: must be > 0"),
        ({"watchdog_s": -1.0}, "safety.watchdog_s: must be >= 0"),
        ({"estop_action": "brake"}, "safety.estop_action: must be one of"),
        ({"estop_port": 70000}, "safety.estop_port: must be in [0, 65535]"),
        ({"estop_key": "xx"}, "safety.estop_key: must be one printable character"),
        ({"estop_key": " "}, "safety.estop_key: must be one printable character"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SafetyConfig(**kwargs)


def test_a_bad_flag_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(_EdgeLike, prog="pirl-edge", args=["--safety.estop_action=brake"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "safety.estop_action: must be one of" in err


# --------------------------------------------------------------------------------------- bounds


def test_bounds_from_stats_adds_the_margin_of_each_dims_range():
    b = bounds_from_stats({"min": np.array([0.0, -1.0, 5.0]), "max": np.array([10.0, 1.0, 5.0])}, 0.1)
    assert b.source == "dataset" and b.low.dtype == np.float32
    np.testing.assert_allclose(b.low, [-1.0, -1.2, 5.0], rtol=1e-6)
    np.testing.assert_allclose(b.high, [11.0, 1.2, 5.0], rtol=1e-6)  # a dim that never moved stays pinned
    t = bounds_from_stats({"min": torch.tensor([0.0]), "max": torch.tensor([2.0])}, 0.0)  # LeRobot's stats
    np.testing.assert_allclose([t.low[0], t.high[0]], [0.0, 2.0])
    with pytest.raises(ValueError, match="need 'min' and 'max'"):
        bounds_from_stats({"mean": [0.0]}, 0.1)
    with pytest.raises(ValueError, match="min has 2 dims, max 1"):
        bounds_from_stats({"min": [0.0, 1.0], "max": [1.0]}, 0.1)


def test_bounds_precedence_is_config_then_dataset_then_robot():
    stats = {"min": [-2.0, -2.0, -2.0], "max": [2.0, 2.0, 2.0]}
    limits = {"gripper.pos": (0.0, 100.0), "shoulder_pan.pos": (-90.0, 90.0), "elbow_flex.pos": (-45.0, 45.0)}
    explicit = SafetyConfig(action_min=[-1.0, -1.0, 0.0], action_max=[1.0, 1.0, 1.0])
    b = resolve_bounds(explicit, 3, dataset_stats=stats, robot_limits=limits, names=NAMES)
    assert b.source == "config" and b.low.tolist() == [-1.0, -1.0, 0.0]
    b = resolve_bounds(SafetyConfig(bounds_margin=0.0), 3, dataset_stats=stats, robot_limits=limits, names=NAMES)
    assert b.source == "dataset" and b.high.tolist() == [2.0, 2.0, 2.0]
    b = resolve_bounds(SafetyConfig(), 3, robot_limits=limits, names=NAMES)
    assert b.source == "robot"  # ordered by the action names, not the dict
    assert b.low.tolist() == [-90.0, -45.0, 0.0] and b.high.tolist() == [90.0, 45.0, 100.0]


def test_bounds_errors_name_the_source_and_the_dims():
    with pytest.raises(ValueError, match="safety.action_min / safety.action_max: 2 values for 3 action dims"):
        resolve_bounds(SafetyConfig(action_min=[0.0, 0.0], action_max=[1.0, 1.0]), 3, names=NAMES)
    with pytest.raises(ValueError, match="dataset action stats: 2 dims for 3 action dims"):
        resolve_bounds(SafetyConfig(), 3, dataset_stats={"min": [0.0, 0.0], "max": [1.0, 1.0]})
    with pytest.raises(ValueError, match=r"robot action_limits: no limits for \['gripper.pos'\]"):
        resolve_bounds(
            SafetyConfig(), 3, robot_limits={"shoulder_pan.pos": (0, 1), "elbow_flex.pos": (0, 1)}, names=NAMES
        )
    with pytest.raises(ValueError, match="action names: 2 names for 3 action dims"):
        resolve_bounds(SafetyConfig(), 3, names=NAMES[:2])
    with pytest.raises(ValueError, match="allow_missing_bounds"):
        resolve_bounds(SafetyConfig(), 3)  # no bounds anywhere: the edge refuses to start
    b = resolve_bounds(SafetyConfig(allow_missing_bounds=True), 3)
    assert b.source == "none" and np.isinf(b.high).all()


def test_robot_action_limits_is_optional():
    assert robot_action_limits(object()) is None
    robot = type("R", (), {"action_limits": {"a": (0.0, 1.0)}})()
    assert robot_action_limits(robot) == {"a": (0.0, 1.0)}


# ---------------------------------------------------------------------------------------- layer


def test_out_of_bound_actions_are_clamped_flagged_and_counted():
    layer = SafetyLayer(BOUNDS, None, NAMES, robot_id="safety-clamp")
    r = layer.filter(np.array([3.0, -0.5, -2.0]), None)
    assert r.command.dtype == np.float32 and r.command.tolist() == [1.0, -0.5, 0.0]
    assert r.clamped and not r.limited and not r.held and r.clamped_dims == (0, 2)
    assert "clamped shoulder_pan.pos, gripper.pos" in layer.describe(r)
    assert layer.filter(np.array([0.5, 0.5, 0.5]), None).clamped is False
    assert layer.stats.clamped_ticks == 1
    assert sample("pirl_edge_safety_clamped_ticks_total", robot_id="safety-clamp") == 1


def test_a_jump_above_max_delta_is_limited_relative_to_the_last_sent_command():
    layer = SafetyLayer(BOUNDS, 0.1, NAMES, robot_id="safety-jump")
    last = np.array([0.0, 0.0, 0.5], np.float32)
    r = layer.filter(np.array([0.5, -0.05, 0.3]), last)
    np.testing.assert_allclose(r.command, [0.1, -0.05, 0.4], rtol=1e-6)
    assert r.limited and r.limited_dims == (0, 2) and not r.clamped
    per_dim = SafetyLayer(BOUNDS, [0.1, 0.2, 0.3], NAMES)
    np.testing.assert_allclose(per_dim.filter(np.array([1.0, 1.0, 1.0]), np.zeros(3)).command, [0.1, 0.2, 0.3])
    assert layer.stats.limited_ticks == 1
    assert sample("pirl_edge_safety_jump_limited_ticks_total", robot_id="safety-jump") == 1
    with pytest.raises(ValueError, match="safety.max_delta: 2 values for 3 action dims"):
        SafetyLayer(BOUNDS, [0.1, 0.2], NAMES)


def test_clamp_then_limit_brings_a_robot_outside_the_bounds_back_gradually():
    layer = SafetyLayer(BOUNDS, 0.25, NAMES)
    observed = np.array([2.0, 0.0, 0.5], np.float32)  # the first tick's last_sent: where the robot is
    r = layer.filter(np.array([5.0, 0.0, 0.5]), observed)
    assert r.clamped and r.limited and r.command.tolist() == [1.75, 0.0, 0.5]  # never a jump to the bound


def test_no_fresh_action_holds_the_last_command_or_sends_nothing():
    layer = SafetyLayer(BOUNDS, 0.1, NAMES, robot_id="safety-hold")
    r = layer.filter(None, None)
    assert r.held and r.command is None  # nothing commanded yet: nothing to repeat
    last = np.array([0.2, 0.3, 0.4], np.float32)
    r = layer.filter(None, last)
    assert r.held and r.command.tolist() == last.tolist() and r.command is not last
    r = layer.filter(np.array([np.nan, 0.0, 0.0]), last)  # a broken policy output never reaches the motors
    assert r.held and r.command.tolist() == last.tolist()
    assert layer.stats.held_ticks == 3
    assert sample("pirl_edge_safety_held_ticks_total", robot_id="safety-hold", reason="no_action") == 2
    assert sample("pirl_edge_safety_held_ticks_total", robot_id="safety-hold", reason="nonfinite") == 1
    with pytest.raises(ValueError, match="an action of 2 dims for 3 bounds"):
        layer.filter(np.zeros(2), last)


def test_robot_action_dicts_round_trip():
    cmd = np.array([0.1, 0.2, 0.3], np.float32)
    d = as_robot_action(cmd, NAMES)
    assert list(d) == NAMES and from_robot_action(d, NAMES).tolist() == cmd.tolist()
    obs = {"shoulder_pan.pos": 1.0, "elbow_flex.pos": 2.0, "gripper.pos": 3.0, "front": np.zeros((2, 2, 3))}
    assert positions_from_observation(obs, NAMES) == {
        "shoulder_pan.pos": 1.0,
        "elbow_flex.pos": 2.0,
        "gripper.pos": 3.0,
    }


# -------------------------------------------------------------------------- a fake robot and loop


class FakeBus:
    def __init__(self):
        self.torque_off_calls = 0

    def disable_torque(self, motors=None, num_retry=0):
        self.torque_off_calls += 1


class FakeRobot:
    """LeRobot's robot surface: get_observation() -> dict, send_action(dict) -> dict actually sent."""

    def __init__(self, with_bus: bool = True):
        self.pos = dict.fromkeys(NAMES, 0.0)
        self.sent: list[tuple[float, dict, str]] = []  # (monotonic time, action, "policy" | "estop")
        self.kind = "policy"
        self._lock = threading.Lock()
        if with_bus:
            self.bus = FakeBus()

    def get_observation(self) -> dict:
        return {**self.pos, "front": np.zeros((4, 4, 3), np.uint8)}

    def send_action(self, action: dict) -> dict:
        with self._lock:
            self.sent.append((time.monotonic(), dict(action), self.kind))
        self.pos.update(action)
        return dict(action)

    def policy_sends_after(self, t: float) -> int:
        return sum(1 for ts, _, kind in self.sent if kind == "policy" and ts > t)


def fake_paced_loop(robot, layer, responder, *, hz=200.0, duration_s=0.6, watchdog=None, on_tick=None):
    """The edge's paced loop as far as safety goes: e-stop check first, then the layer, then send."""
    period, next_tick = 1.0 / hz, time.monotonic()
    last_sent = from_robot_action(positions_from_observation(robot.get_observation(), NAMES), NAMES)
    rng = np.random.default_rng(0)
    end, tick, estopped_at_tick = time.monotonic() + duration_s, 0, None
    while time.monotonic() < end:
        delay = next_tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        next_tick += period
        if watchdog is not None:
            watchdog.kick()
        if on_tick is not None:
            on_tick(tick)
        tick += 1
        obs = robot.get_observation()
        robot.kind = "estop"
        if responder(positions_from_observation(obs, NAMES)):
            estopped_at_tick = estopped_at_tick if estopped_at_tick is not None else tick  # episode failed
            continue
        robot.kind = "policy"
        result = layer.filter(rng.uniform(-2, 2, size=3).astype(np.float32), last_sent)
        if result.command is None:
            continue
        last_sent = from_robot_action(robot.send_action(as_robot_action(result.command, NAMES)), NAMES)
    return estopped_at_tick


@pytest.mark.parametrize("mode, with_bus, expected", [("hold", True, "hold"), ("torque_off", True, "torque_off")])
def test_after_an_estop_no_policy_action_is_sent_and_the_estop_action_runs_once(mode, with_bus, expected):
    robot_id = f"safety-loop-{mode}"
    robot = FakeRobot(with_bus=with_bus)
    estop = EStop(robot_id)
    layer = SafetyLayer(BOUNDS, 0.2, NAMES, estop=estop, robot_id=robot_id)
    responder = EStopResponder(estop, robot, mode, robot_id=robot_id)
    fired: dict[str, float] = {}

    def trigger_later():
        time.sleep(0.2)
        fired["t"] = time.monotonic()
        estop.trigger("test")

    threading.Thread(target=trigger_later).start()
    at_tick = fake_paced_loop(robot, layer, responder)
    assert at_tick is not None and estop.is_set()
    # at most the one tick that had already passed its e-stop check when the trigger came
    assert robot.policy_sends_after(fired["t"]) <= 1
    assert sum(1 for _, _, kind in robot.sent if kind == "policy") > 10  # it did drive the robot before
    assert responder.last_result == expected
    holds = [a for _, a, kind in robot.sent if kind == "estop"]
    if expected == "hold":
        assert len(holds) == 1 and robot.bus.torque_off_calls == 0
        assert set(holds[0]) == set(NAMES)
    else:
        assert holds == [] and robot.bus.torque_off_calls == 1
    assert layer.stats.estops == 1 and estop.count == 1
    assert sample("pirl_edge_safety_estops_total", robot_id=robot_id, source="test") == 1
    assert sample("pirl_edge_safety_estop_latched", robot_id=robot_id) == 1
    assert sample("pirl_edge_safety_estop_actions_total", robot_id=robot_id, action=expected) == 1


def test_release_clears_the_estop_and_a_new_latch_applies_the_action_again():
    robot = FakeRobot()
    estop = EStop("safety-release")
    responder = EStopResponder(estop, robot, "torque_off")
    assert responder(None) is False
    estop.trigger("a")
    first = estop.latch_id
    estop.trigger("b")  # already latched: neither a new latch nor a second action
    assert estop.source == "a" and estop.latch_id == first and estop.latched_at is not None
    assert responder(None) and responder(None) and robot.bus.torque_off_calls == 1
    assert estop.poll() == 0 and estop.count == 1  # the filter-less path counted it in the responder
    assert estop.release("test") is True and not estop.is_set() and estop.latched_at is None
    assert sample("pirl_edge_safety_estop_latched", robot_id="safety-release") == 0
    assert responder(None) is False
    estop.trigger("c")
    assert estop.latch_id != first and responder(None) and robot.bus.torque_off_calls == 2
    assert estop.release() is True and estop.release() is False


def test_estop_action_falls_back_to_hold_and_never_raises(caplog):
    class NoTorque:
        def __init__(self):
            self.sent = []

        def send_action(self, action):
            self.sent.append(action)
            return action

    class Broken(NoTorque):
        def disable_torque(self):
            raise OSError("bus gone")

        def send_action(self, action):
            raise ConnectionError("serial port closed")

    class OwnTorque(NoTorque):  # e.g. LeRobot's reBot B601 has robot.disable_torque()
        calls = 0

        def disable_torque(self):
            self.calls += 1

    pos = {"gripper.pos": 0.5}
    r = NoTorque()
    assert apply_estop_action(r, "torque_off", pos, robot_id="safety-apply") == "hold" and r.sent == [pos]
    assert apply_estop_action(NoTorque(), "hold", None, robot_id="safety-apply") == "none"
    with caplog.at_level(logging.ERROR, logger="edge.safety"):
        assert apply_estop_action(Broken(), "torque_off", pos, robot_id="safety-apply") == "failed"
    assert "bus gone" in caplog.text and "serial port closed" in caplog.text
    own = OwnTorque()
    assert apply_estop_action(own, "torque_off", pos) == "torque_off" and own.calls == 1 and own.sent == []
    assert sample("pirl_edge_safety_estop_actions_total", robot_id="safety-apply", action="failed") == 1
    with pytest.raises(ValueError, match="safety.estop_action"):
        apply_estop_action(own, "brake", pos)


def _post(port: int, path: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("source", ["sigusr1", "http", "key"])
def test_an_estop_from_every_operator_source_stops_the_loop(source):
    """SIGUSR1 (in the main thread, as Python delivers it), the HTTP port and the key, each mid-run."""
    robot_id = f"safety-src-{source}"
    robot = FakeRobot()
    estop = EStop(robot_id)
    layer = SafetyLayer(BOUNDS, 0.2, NAMES, estop=estop, robot_id=robot_id)
    responder = EStopResponder(estop, robot, "hold", robot_id=robot_id)
    port = free_port() if source == "http" else 0
    fired: dict[str, float] = {}
    inputs = OperatorInputs(estop, estop_port=port, keyboard=False, sigusr1=source == "sigusr1")
    with inputs:

        def on_tick(tick):
            if tick != 40:
                return
            fired["t"] = time.monotonic()
            if source == "sigusr1":
                os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs in this (the main) thread
            elif source == "http":
                assert _post(port, "/estop")["estop"] is True
            else:
                inputs.feed("x")

        at_tick = fake_paced_loop(robot, layer, responder, hz=200.0, duration_s=0.5, on_tick=on_tick)
    assert at_tick is not None and at_tick <= 42
    assert robot.policy_sends_after(fired["t"]) <= 1
    assert estop.source == source and layer.stats.estops == 1
    assert sample("pirl_edge_safety_estops_total", robot_id=robot_id, source=source) == 1
    assert sum(1 for _, _, kind in robot.sent if kind == "estop") == 1


def test_sigusr1_latches_the_estop_and_only_the_main_thread_installs_it():
    estop = EStop()
    previous = install_sigusr1(estop)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert estop.wait(timeout=5)
        assert estop.source == "sigusr1" and estop.poll() == 1
    finally:
        signal.signal(signal.SIGUSR1, previous)
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, install_sigusr1, estop)))
    t.start()
    t.join()
    assert errors and "main thread" in str(errors[0].value)


# ------------------------------------------------------------------------------------- watchdog


class TripRecorder:
    def __init__(self):
        self.times: list[float] = []

    def __call__(self):
        self.times.append(time.monotonic())


def kick_for(wd: Watchdog, seconds: float, every: float = 0.005) -> float:
    """Kick like a loop ticking every ``every`` s; returns the time of the last kick."""
    end = time.monotonic() + seconds
    while True:
        wd.kick()
        last = time.monotonic()
        if last >= end:
            return last
        time.sleep(every)


def test_watchdog_fires_once_per_stall_and_rearms_at_the_next_kick():
    trips = TripRecorder()
    stats = SafetyLayer(BOUNDS).stats
    with Watchdog(0.1, trips, robot_id="safety-watchdog", stats=stats, check_s=0.01) as wd:
        stalled = kick_for(wd, 0.2)
        assert trips.times == []
        time.sleep(0.5)  # the loop blocks for 5 timeouts: one trip
        assert len(trips.times) == 1 and 0.09 <= trips.times[0] - stalled < 0.4
        kick_for(wd, 0.2)
        time.sleep(0.3)  # a second stall
        assert len(trips.times) == 2
    assert wd.trips == 2 and stats.watchdog_trips == 2
    assert sample("pirl_edge_safety_watchdog_trips_total", robot_id="safety-watchdog") == 2


def test_watchdog_quiet_while_paused_or_kicked_and_off_at_zero():
    trips = TripRecorder()
    with Watchdog(0.1, trips, check_s=0.01) as wd:
        kick_for(wd, 0.4)
        wd.pause()  # e.g. waiting for the operator's start
        time.sleep(0.4)
        wd.resume()  # counts as a kick: no trip right after a long pause
        kick_for(wd, 0.2)
        assert trips.times == []
    off = Watchdog(0, trips).start()
    assert not off.enabled and off._thread is None
    off.kick()
    off.stop()


def test_watchdog_trip_can_latch_the_estop_and_survives_a_failing_callback(caplog):
    estop = EStop()
    with Watchdog(0.05, lambda: estop.trigger("watchdog"), check_s=0.01) as wd:
        wd.kick()
        assert estop.wait(timeout=5) and estop.source == "watchdog"

    def boom():
        raise RuntimeError("callback broke")

    with caplog.at_level(logging.ERROR, logger="edge.safety"), Watchdog(0.05, boom, check_s=0.01) as wd:
        deadline = time.monotonic() + 5
        while wd.trips == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
    assert wd.trips == 1 and "callback broke" in caplog.text

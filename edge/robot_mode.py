"""Robot mode of ``pirl-edge``: the robot, its safety layer, the operator's inputs and the session
dataset, set up around the robot loop (``edge.robot_loop``) and taken down after it.

Start-up refuses, with one line naming what is wrong and before the spool is opened: a robot that
cannot be built or connected, a policy that does not fit the robot's features, missing action bounds,
an operator start or operator labels without any way for an operator to give them, a teleoperator whose
actions are not the robot's.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass

from edge import metrics
from edge.devices import build_robot, build_teleop, connect_robot, connect_teleop, disconnect_robot, given_type
from edge.robot_features import RobotIO, check_policy_fits, trained_feature_names
from edge.robot_loop import RobotLoop
from edge.safety import EStop, SafetyLayer, Watchdog, resolve_bounds, robot_action_limits

log = logging.getLogger(__name__)


def action_stats(postprocessor) -> dict | None:
    """The SFT dataset's action statistics (min / max / ...) the policy un-normalises with."""
    for step in getattr(postprocessor, "steps", []):
        stats = getattr(step, "stats", None)
        if stats and "action" in stats:
            return stats["action"]
    return None


def check_teleop_fits(teleop, io: RobotIO, teleop_type: str, robot_type: str) -> None:
    """A teleoperator takes over only if its actions are the robot's (same names): one line otherwise."""
    names = list(getattr(teleop, "action_features", {}) or {})
    if sorted(names) != sorted(io.action_names):
        raise ValueError(
            f"teleop.type={teleop_type}: its actions {names} are not robot.type={robot_type}'s {io.action_names}; "
            "take over with a teleoperator that commands the robot's own actions (e.g. its leader arm)"
        )


@dataclass
class RobotSide:
    cfg: object  # EdgeConfig
    robot: object
    io: RobotIO
    safety: SafetyLayer
    estop: EStop
    task: str | None
    inputs: object = None
    watchdog: Watchdog | None = None
    recorder: object = None
    teleop: object = None
    detector: object = None
    closed: bool = False

    @classmethod
    def start(cls, cfg, policy, postprocessor) -> RobotSide:
        robot_type = given_type(cfg.robot)
        # the features are known before connecting: a policy that does not fit fails without touching the robot
        probe = build_robot(cfg.robot)
        io = RobotIO.of(probe)
        names = trained_feature_names(cfg.policy.path)
        if names is None:
            log.info("the policy's training dataset is not on this machine: robot features checked by shape only")
        check_policy_fits(policy.config, io, robot_type, names)
        bounds = resolve_bounds(
            cfg.safety,
            len(io.action_names),
            dataset_stats=action_stats(postprocessor),
            robot_limits=robot_action_limits(probe),
            names=io.action_names,
        )
        log.info("action bounds (%s): %s .. %s", bounds.source, bounds.low.tolist(), bounds.high.tolist())
        interactive = sys.stdin is not None and sys.stdin.isatty()
        if cfg.episode.start == "operator" and not interactive and not cfg.safety.estop_port:
            raise ValueError(
                "episode.start=operator: no way for an operator to start episodes here (stdin is not a terminal "
                "and safety.estop_port is 0): give --safety.estop_port=PORT (POST /start) or --episode.start=delay"
            )
        if cfg.episode.outcome == "operator" and not interactive and not cfg.safety.estop_port and cfg.teleop is None:
            raise ValueError(
                "episode.outcome=operator: no way for an operator to label episodes here (stdin is not a terminal, "
                "safety.estop_port is 0 and there is no teleoperator): give --safety.estop_port=PORT (POST /success "
                "/failure /abort)"
            )
        teleop = None
        if cfg.teleop is not None:
            teleop = build_teleop(cfg.teleop)
            check_teleop_fits(teleop, io, given_type(cfg.teleop, "teleop"), robot_type)
        if cfg.episode.outcome == "robot" and not hasattr(probe, "episode_status"):
            log.warning(
                "episode.outcome=robot: robot.type=%s does not judge its own episodes, so every episode ends at the time "
                "limit without success (reward 0): use --episode.outcome=operator (labels) or detector",
                robot_type,
            )
        detector = None
        if cfg.detector.path is not None:
            from edge.success_detector import SuccessDetector

            detector = SuccessDetector.from_config(cfg.detector, cameras=io.cameras)
        robot = probe
        connect_robot(robot, cfg.robot)
        if teleop is not None:
            try:
                connect_teleop(teleop, cfg.teleop)
            except Exception:
                disconnect_robot(robot)
                raise
        estop = EStop(robot_id=cfg.link.robot_id)
        safety = SafetyLayer(bounds, cfg.safety.max_delta, io.action_names, estop=estop, robot_id=cfg.link.robot_id)
        return cls(cfg, robot, io, safety, estop, cfg.policy.task, teleop=teleop, detector=detector)

    def loop(self, worker, writer, stop: threading.Event, lead=None) -> RobotLoop:
        """The robot loop, with the operator's inputs, the watchdog and the session dataset running;
        ``lead``: when to ask for the next chunk (edge.chunk_schedule.LeadTime; default: measured)."""
        from edge.operator_inputs import OperatorInputs

        cfg, rid = self.cfg, self.cfg.link.robot_id
        self.inputs = OperatorInputs(
            self.estop,
            estop_key=cfg.safety.estop_key,
            estop_port=cfg.safety.estop_port,
            status=lambda: self._loop.status() if getattr(self, "_loop", None) else {"phase": "starting"},
        )
        self.inputs.start()
        if cfg.dataset.enabled:
            from edge.session_dataset import SessionRecorder

            root, repo_id = cfg.dataset.resolve(rid)
            self.recorder = SessionRecorder(
                root,
                repo_id=repo_id,
                fps=round(cfg.control.hz),
                robot_type=given_type(cfg.robot),
                features=self.io.dataset_features(use_videos=cfg.dataset.video),
                task=self.task or "",
                use_videos=cfg.dataset.video,
                vcodec=cfg.dataset.vcodec,
                queue_frames=cfg.dataset.queue_frames,
                on_drop=metrics.DATASET_FRAMES_DROPPED.labels(rid).inc,
            )
            log.info("recording this session as a LeRobotDataset at %s", root)
        self.watchdog = Watchdog(cfg.safety.watchdog_s, None, robot_id=rid, stats=self.safety.stats)
        self._loop = RobotLoop(
            self.robot,
            self.io,
            worker,
            writer,
            self.safety,
            self.estop,
            robot_id=rid,
            control_hz=cfg.control.hz,
            episode=cfg.episode,
            inputs=self.inputs,
            watchdog=self.watchdog,
            recorder=self.recorder,
            estop_action=cfg.safety.estop_action,
            teleop=self.teleop,
            outcome=cfg.episode.outcome,
            detector=self.detector,
            lead=lead,
        )
        self.watchdog.start()
        return self._loop

    def close(self, loop: RobotLoop | None) -> None:
        """Stop the watchdog and the inputs, write the queued records, finalize the dataset, disconnect
        the robot (in that order: nothing is lost, the robot is released last). Idempotent."""
        if self.closed:
            return
        self.closed = True
        for part in (self.watchdog, self.inputs):
            if part is not None:
                try:
                    part.stop()
                except Exception:  # noqa: BLE001  go on: the dataset and the robot still need closing
                    log.exception("stopping %s failed", type(part).__name__)
        if loop is not None:
            loop.close()
        if self.detector is not None:
            self.detector.close()
        if self.recorder is not None:
            self._dataset = self.recorder.close()
        if self.teleop is not None:
            disconnect_robot(self.teleop)
        disconnect_robot(self.robot)

    def summary(self) -> dict:
        out = {
            "robot_type": given_type(self.cfg.robot),
            "safety": self.safety.stats.summary(),
            "action_bounds": {
                "source": self.safety.bounds.source,
                "low": self.safety.bounds.low.tolist(),
                "high": self.safety.bounds.high.tolist(),
            },
        }
        if self.recorder is not None:
            out["dataset"] = {"root": str(self.recorder.root), **self.recorder.summary()}
        if self.detector is not None:
            out["detector"] = self.detector.stats()
        return out

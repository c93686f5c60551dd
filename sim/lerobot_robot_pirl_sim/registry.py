"""The process-wide registry of connected :class:`~lerobot_robot_pirl_sim.pirl_sim.PirlSim` robots, by ``id``.

Why: LeRobot builds a robot and its teleoperator separately from their configs (``lerobot-record
--robot.type=pirl_sim --robot.id=sim0 --teleop.type=pirl_sim_expert --teleop.id=sim0``). A real
teleoperator reads its own hardware; the scripted expert has none, it needs the simulated world's state. So a
``PirlSim`` registers itself here on ``connect()`` and leaves on ``disconnect()``, and the expert
teleoperator finds the robot with its own ``id`` (``None`` matches ``None``). Ids are unique among connected
sims, as serial ports are among real arms.

The registry also disconnects every sim still connected when the interpreter exits (their physics and render
threads are daemons; stopping them before finalisation frees the GL contexts cleanly).
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import weakref
from typing import Any

__all__ = ["add", "connected_ids", "find", "remove"]

_lock = threading.Lock()
_live: dict[str | None, weakref.ref] = {}


def add(robot: Any) -> None:
    """Register a connecting robot under its ``id``; a second live robot with the same id is refused."""
    with _lock:
        ref = _live.get(robot.id)
        other = ref() if ref is not None else None
        if other is not None and other is not robot:
            raise ValueError(f"a pirl_sim robot with id {robot.id!r} is already connected in this process")
        _live[robot.id] = weakref.ref(robot)


def remove(robot: Any) -> None:
    with _lock:
        ref = _live.get(robot.id)
        if ref is not None and ref() in (robot, None):
            del _live[robot.id]


def find(robot_id: str | None) -> Any:
    """The connected robot with ``robot_id``; LookupError (naming the connected ids) when there is none."""
    with _lock:
        ref = _live.get(robot_id)
        robot = ref() if ref is not None else None
        if robot is None:
            ids = sorted(repr(k) for k, r in _live.items() if r() is not None)
            raise LookupError(
                f"no connected pirl_sim robot with id {robot_id!r} in this process (connected: {', '.join(ids) or 'none'});"
                " give the teleoperator the robot's id and connect the robot"
            )
        return robot


def connected_ids() -> list[str | None]:
    with _lock:
        return [k for k, r in _live.items() if r() is not None]


@atexit.register
def _disconnect_all() -> None:
    with _lock:
        robots = [r() for r in _live.values()]
    for robot in robots:
        if robot is not None and robot.is_connected:
            # best effort at exit: nothing can be reported any more
            with contextlib.suppress(Exception):
                robot.disconnect()

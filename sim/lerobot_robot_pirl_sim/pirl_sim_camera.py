"""``PirlSimCamera``: a LeRobot ``Camera`` that renders the simulated robot's scene offscreen with MuJoCo.

Each camera runs one thread with its own ``mujoco.Renderer`` (its own GL context, created, used and freed in
that thread, as OpenGL contexts must be) and its own ``MjData``, filled from the robot's physics state under
the robot's lock at the camera's ``fps``. Rendering releases the GIL, so the control loop keeps running while a
frame renders (about 14 ms for 64 x 64 on a CPU with EGL or OSMesa).

The robot builds and connects its cameras (it owns the scene): a ``PirlSimCamera`` made on its own by
``make_cameras_from_configs`` has no scene to look at and refuses ``connect()``.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import mujoco
import numpy as np
from lerobot.cameras import Camera
from lerobot.utils.errors import DeviceAlreadyConnectedError, DeviceNotConnectedError

from lerobot_robot_pirl_sim.config_pirl_sim import CAMERA_NAMES, PirlSimCameraConfig

__all__ = ["PirlSimCamera"]

CONNECT_TIMEOUT_S = 20.0  # first frame: creating a GL context can take a while on a loaded machine


class SceneSource(Protocol):
    """What a camera needs from the robot: the model, and a consistent copy of the current state."""

    model: mujoco.MjModel

    def copy_state(self, data: mujoco.MjData) -> None: ...


class PirlSimCamera(Camera):
    def __init__(self, config: PirlSimCameraConfig, source: SceneSource | None = None):
        super().__init__(config)
        self.config = config
        self._source = source
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._new_frame = threading.Condition()
        self._frame: np.ndarray | None = None
        self._frame_id = 0  # frames rendered since connect
        self._copy_id = 0  # state copies started since connect (a frame shows the state of copy `_frame_copy`)
        self._frame_copy = 0
        self._frame_time = 0.0  # time.monotonic() of the latest frame
        self._consumed_id = 0  # the latest frame async_read returned
        self._error: BaseException | None = None

    def __str__(self) -> str:
        return f"PirlSimCamera({self.config.camera})"

    def attach(self, source: SceneSource) -> None:
        """The scene to render (the robot calls this before ``connect``)."""
        self._source = source

    @property
    def is_connected(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    @staticmethod
    def find_cameras() -> list[dict[str, Any]]:
        return [{"type": "pirl_sim", "id": name, "name": name} for name in CAMERA_NAMES]

    def connect(self, warmup: bool = True) -> None:
        """Start the render thread and wait for its first frame (so every observation has one)."""
        if self.is_connected:
            raise DeviceAlreadyConnectedError(f"{self} is already connected.")
        if self._source is None:
            raise DeviceNotConnectedError(
                f"{self} renders a pirl_sim robot's scene: the robot creates and connects its cameras"
            )
        self._stop.clear()
        self._error, self._frame, self._frame_id, self._consumed_id = None, None, 0, 0
        self._copy_id = self._frame_copy = 0
        self._thread = threading.Thread(target=self._run, name=f"pirl_sim-render-{self.config.camera}", daemon=True)
        self._thread.start()
        with self._new_frame:
            self._new_frame.wait_for(lambda: self._frame is not None or self._error is not None, CONNECT_TIMEOUT_S)
        if self._frame is None:
            error = self._error
            self.disconnect()
            if error is not None:
                raise RuntimeError(
                    f"{self} could not render: {error}. Offscreen rendering needs MUJOCO_GL=egl (libEGL) or osmesa "
                    "(libOSMesa) set before mujoco is first imported; this package sets egl unless MUJOCO_GL is set"
                )
            raise TimeoutError(f"{self} rendered no frame within {CONNECT_TIMEOUT_S:.0f}s")

    def _run(self) -> None:
        cfg = self.config
        try:
            model = self._source.model
            renderer = mujoco.Renderer(model, height=cfg.height, width=cfg.width)
        except Exception as e:  # reported by connect()
            with self._new_frame:
                self._error = e
                self._new_frame.notify_all()
            return
        data = mujoco.MjData(model)
        period = 1.0 / cfg.fps
        due = time.monotonic()
        try:
            while not self._stop.is_set():
                with self._new_frame:
                    self._copy_id += 1
                    copy_id = self._copy_id
                self._source.copy_state(data)
                mujoco.mj_fwdPosition(model, data)  # body, camera and light poses of the copied state
                renderer.update_scene(data, camera=cfg.camera)
                frame = renderer.render().copy()  # the renderer reuses its buffer; a frame handed out must not change
                with self._new_frame:
                    self._frame, self._frame_copy = frame, copy_id
                    self._frame_id, self._frame_time = self._frame_id + 1, time.monotonic()
                    self._new_frame.notify_all()
                due += period
                now = time.monotonic()
                if due < now - period:  # fell behind (a loaded machine): skip the frames, do not burst
                    due = now
                self._stop.wait(max(0.0, due - now))
        except Exception as e:
            with self._new_frame:
                self._error = e
                self._new_frame.notify_all()
        finally:
            renderer.close()

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"{self} stopped rendering: {self._error}")
        if not self.is_connected:
            raise DeviceNotConnectedError(f"{self} is not connected.")

    def async_read(self, timeout_ms: float = 200) -> np.ndarray:
        """The latest frame not returned yet by this method, waiting up to ``timeout_ms`` for one."""
        self._check()
        with self._new_frame:
            fresh = self._new_frame.wait_for(
                lambda: self._frame_id > self._consumed_id or self._error is not None or self._stop.is_set(),
                timeout_ms / 1000.0,
            )
            self._check()
            if not fresh:
                raise TimeoutError(f"{self}: no new frame within {timeout_ms} ms")
            self._consumed_id = self._frame_id
            return self._frame

    def read(self) -> np.ndarray:
        """A frame of the scene as it is when this call begins (its state was copied after that); waits up to
        two frame periods plus a margin."""
        self._check()
        with self._new_frame:
            after = self._copy_id
            done = self._new_frame.wait_for(
                lambda: self._frame_copy > after or self._error is not None or self._stop.is_set(), 2.0 / self.fps + 1.0
            )
            self._check()
            if not done:
                raise TimeoutError(f"{self}: no new frame within {2.0 / self.fps + 1.0:.1f} s")
            return self._frame

    def read_latest(self, max_age_ms: int = 500) -> np.ndarray:
        """The latest frame, without waiting; TimeoutError when it is older than ``max_age_ms``."""
        self._check()
        with self._new_frame:
            age_ms = (time.monotonic() - self._frame_time) * 1000.0
            if age_ms > max_age_ms:
                raise TimeoutError(f"{self}: the latest frame is {age_ms:.0f} ms old (> {max_age_ms} ms)")
            return self._frame

    def latest(self) -> np.ndarray:
        """The latest frame whatever its age (what the robot's observation carries)."""
        self._check()
        return self._frame

    def disconnect(self) -> None:
        """Stop the render thread; it frees its renderer and GL context on its way out."""
        if self._thread is None:
            raise DeviceNotConnectedError(f"{self} is not connected.")
        self._stop.set()
        with self._new_frame:
            self._new_frame.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)
        self._thread = None

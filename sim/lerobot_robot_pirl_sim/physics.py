"""The task's physics, shared by the robot (:mod:`.pirl_sim`) and its batched twin (:mod:`.vec_env`).

A gantry over a table: a carriage moved by two horizontal slide joints ``x`` and ``y`` (position servos
with a force limit and damping, so the end-effector has inertia and a top speed), a two-finger gripper
(one slide joint per finger, one position servo each, driven by the same target) and a cube lying on the
table. Closing the gripper ends the episode: the fingers reach the cube's sides when the opening is at
``GRASP_THRESHOLD`` %, and the grasp is a success only if the end-effector is then within
``success_radius`` of the cube *and* slower than ``max_speed_at_grasp``; otherwise it is a failed grasp.
This is the built-in ``pirl_reach`` task's structure ("stop on the target, then close") with MuJoCo
physics and a LeRobot arm's absolute position targets as actions.

Units (the robot reports exactly these, and the vec env returns them as float32):

- ``x.pos``, ``y.pos``: end-effector position on the table, metres (0, 0 is the table's centre);
- ``x.vel``, ``y.vel``: its velocity, metres per second;
- ``gripper.pos``: finger opening, percent (0 = closed, 100 = fully open), LeRobot's gripper range;
- ``cube.x``, ``cube.y``: the cube's centre on the table, metres.

Actions are absolute targets in the same units: ``x.pos``, ``y.pos`` (metres, clipped to
``+-WORKSPACE``) and ``gripper.pos`` (percent, clipped to ``[0, 100]``).

Contacts are disabled: the grasp is judged geometrically, so no contact solver runs and a physics step costs
about 2 microseconds (the vec env steps hundreds of thousands of them per minute of PI-RL).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

# MuJoCo picks its OpenGL backend when it is imported; EGL renders offscreen without a display (osmesa is
# the software fallback a user can choose by setting MUJOCO_GL=osmesa before importing this package).
os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402

__all__ = [
    "ACTION_NAMES",
    "ENV_STATE_NAMES",
    "GRASP_THRESHOLD",
    "OBS_NAMES",
    "STATE_NAMES",
    "TASK_DESCRIPTION",
    "WORKSPACE",
    "SimModel",
    "TaskParams",
    "build_mjcf",
]

TASK_DESCRIPTION = "move the gripper over the cube, stop, and grasp it"

# observation and action names, in the order of the vec env's arrays (LeRobot's "<joint>.<quantity>" style)
STATE_NAMES = ("x.pos", "y.pos", "x.vel", "y.vel", "gripper.pos")
ENV_STATE_NAMES = ("cube.x", "cube.y")
OBS_NAMES = STATE_NAMES + ENV_STATE_NAMES
ACTION_NAMES = ("x.pos", "y.pos", "gripper.pos")

WORKSPACE = 0.2  # m: x / y targets are clipped to [-WORKSPACE, WORKSPACE]; the joints' limits are 1 cm beyond
CUBE_SIZE = 0.03  # m, side of the cube
FINGER_TRAVEL = 0.035  # m, each finger's stroke: fully open the pads are 7 cm apart, the cube is 3 cm wide
FINGER_MASS = 0.005  # kg
# the finger servos aim this fraction of the stroke beyond each end for targets of 0 % and 100 %, so an open (or
# closed) gripper is held against its joint limit and the carriage's accelerations do not shake it open or shut
FINGER_PRELOAD = 0.1
GRASP_THRESHOLD = 100.0 * CUBE_SIZE / (2 * FINGER_TRAVEL)  # %: the opening at which the pads touch the cube
EE_HEIGHT = 0.1  # m, carriage height over the table (the fingers reach down to the cube)


@dataclass(frozen=True)
class TaskParams:
    """Everything that defines the task; the robot's config and the vec env build one, so both run the
    same physics. Defaults are the tuned task (``tune.py`` measures them)."""

    # control rate, Hz: one lock-step `send_action` / one vec env step advances the physics by 1 / control_hz seconds
    control_hz: float = 25.0
    # MuJoCo steps per control step (the timestep is 1 / (control_hz * substeps): 8 ms at 25 Hz; the slow servos
    # follow the same trajectories as at 2 ms within 1 % of their speed, at a quarter of the cost)
    substeps: int = 5
    # max end-effector / cube distance for a successful grasp, metres (the open fingers clear the 3 cm cube by 2 cm
    # on each side). With 10 demonstrations, SFT's position targets are off by ~1 cm: tighter radii leave PI-RL's
    # exploration too few successes to learn from
    success_radius: float = 0.02
    # max end-effector speed for a successful grasp, metres per second (a sixth of the top speed: a policy that
    # closes before the arm has settled fails, the mistake few-shot SFT makes and PI-RL corrects)
    max_speed_at_grasp: float = 0.05
    # end-effector start positions are drawn uniformly in [-start_range, start_range]^2, metres
    start_range: float = 0.18
    # cube positions are drawn uniformly in [-cube_range, cube_range]^2, metres
    cube_range: float = 0.16
    # minimum start distance between end-effector and cube, metres (redrawn until met)
    min_start_distance: float = 0.12
    # moving mass of each axis, kg
    axis_mass: float = 1.0
    # x / y servo stiffness, N/m. Soft on purpose: a policy's target jitters from step to step, and a stiff servo
    # turns that into speed (at 200 N/m a 1 cm jitter keeps the arm above the grasp speed; at 50 N/m below it)
    kp: float = 50.0
    # x / y servo damping (velocity feedback inside the servo, limited with its force), N s/m
    kv: float = 0.0
    # x / y passive damping of the rails, N s/m: it also acts with the torque off, and with the servo's force
    # limit it sets the top speed, force_limit / damping (0.3 m/s). With kp it makes the servo slightly
    # underdamped (damping ratio 0.78): a 25 cm move settles in about 1.1 s
    damping: float = 11.0
    # x / y servo force limit, N
    force_limit: float = 3.3
    # x / y Coulomb friction of the rails, N: the servo's force must exceed it to move the carriage, so a target that
    # jitters by less than friction / kp (6 mm) leaves a settled arm standing still, as real rails do
    friction: float = 0.3
    # finger servo stiffness, N/m (the close is first order with time constant finger_damping / finger_kp)
    finger_kp: float = 50.0
    # finger joint damping, N s/m
    finger_damping: float = 4.0

    def __post_init__(self) -> None:
        if self.control_hz <= 0 or self.substeps < 1:
            raise ValueError(f"control_hz must be > 0 and substeps >= 1 (got {self.control_hz}, {self.substeps})")

    @property
    def timestep(self) -> float:
        """MuJoCo timestep, seconds."""
        return 1.0 / (self.control_hz * self.substeps)

    @property
    def action_low(self) -> np.ndarray:
        """Lowest targets, float64 [3] (x.pos m, y.pos m, gripper.pos %)."""
        return np.array([-WORKSPACE, -WORKSPACE, 0.0])

    @property
    def action_high(self) -> np.ndarray:
        """Highest targets, float64 [3]."""
        return np.array([WORKSPACE, WORKSPACE, 100.0])


def build_mjcf(params: TaskParams, cameras: dict[str, tuple[int, int]] | None = None) -> str:
    """The scene as MJCF. ``cameras``: MJCF camera name -> (width, height) to be rendered (sizes the
    offscreen buffer). The scene always has the cameras ``front`` (oblique, from the front edge of the
    table) and ``top`` (straight down)."""
    width = max([640, *(w for w, _ in (cameras or {}).values())])
    height = max([480, *(h for _, h in (cameras or {}).values())])
    p = params
    lim = WORKSPACE + 0.01
    # the x joint moves the beam, the carriage and the fingers, the y joint the carriage and the fingers: the beam
    # is (almost) massless, so both axes move `axis_mass` and respond alike
    carriage_mass = p.axis_mass - 2 * FINGER_MASS
    half = CUBE_SIZE / 2
    return f"""
<mujoco model="pirl_sim">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{p.timestep}" integrator="implicitfast" gravity="0 0 -9.81">
    <flag contact="disable"/>
  </option>
  <visual>
    <global offwidth="{width}" offheight="{height}"/>
    <headlight ambient="0.35 0.35 0.35" diffuse="0.5 0.5 0.5" specular="0 0 0"/>
  </visual>
  <asset>
    <texture name="grid" type="2d" builtin="checker" rgb1="0.55 0.55 0.58" rgb2="0.5 0.5 0.53"
             width="256" height="256" mark="edge" markrgb="0.4 0.4 0.42"/>
    <material name="table" texture="grid" texrepeat="6 6" reflectance="0"/>
  </asset>
  <worldbody>
    <light pos="0 -0.3 1.2" dir="0 0.25 -1" diffuse="0.6 0.6 0.6"/>
    <geom name="table" type="box" size="0.3 0.3 0.01" pos="0 0 -0.01" material="table"/>
    <geom name="rail_left" type="box" size="0.26 0.01 0.01" pos="0 -0.26 {EE_HEIGHT + 0.03}" rgba="0.2 0.2 0.25 1"/>
    <geom name="rail_right" type="box" size="0.26 0.01 0.01" pos="0 0.26 {EE_HEIGHT + 0.03}" rgba="0.2 0.2 0.25 1"/>
    <camera name="front" pos="0 -0.42 0.62" xyaxes="1 0 0 0 0.83 0.56" fovy="50"/>
    <camera name="top" pos="0 0 0.8" xyaxes="1 0 0 0 1 0" fovy="45"/>
    <body name="beam" pos="0 0 {EE_HEIGHT + 0.03}">
      <joint name="x" type="slide" axis="1 0 0" range="{-lim} {lim}" damping="{p.damping}"
             frictionloss="{p.friction}"/>
      <geom name="beam" type="box" size="0.012 0.27 0.008" rgba="0.25 0.25 0.3 1" mass="0.001"/>
      <body name="carriage" pos="0 0 -0.03">
        <joint name="y" type="slide" axis="0 1 0" range="{-lim} {lim}" damping="{p.damping}"
               frictionloss="{p.friction}"/>
        <geom name="carriage" type="box" size="0.025 0.025 0.015" rgba="0.9 0.55 0.1 1" mass="{carriage_mass}"/>
        <geom name="shaft" type="cylinder" size="0.006 0.035" pos="0 0 -0.045" rgba="0.3 0.3 0.3 1" mass="0"/>
        <site name="ee" pos="0 0 {-EE_HEIGHT + 0.03 + half}" size="0.004" rgba="1 1 0 0.6"/>
        <body name="finger_left" pos="0 0 -0.085">
          <joint name="finger_left" type="slide" axis="-1 0 0" range="0 {FINGER_TRAVEL}"
                 damping="{p.finger_damping}"/>
          <geom type="box" size="0.003 0.012 0.02" pos="-{half + 0.003} 0 0" rgba="0.15 0.5 0.9 1" mass="{FINGER_MASS}"/>
        </body>
        <body name="finger_right" pos="0 0 -0.085">
          <joint name="finger_right" type="slide" axis="1 0 0" range="0 {FINGER_TRAVEL}"
                 damping="{p.finger_damping}"/>
          <geom type="box" size="0.003 0.012 0.02" pos="{half + 0.003} 0 0" rgba="0.15 0.5 0.9 1" mass="{FINGER_MASS}"/>
        </body>
      </body>
    </body>
    <body name="cube" mocap="true" pos="0 0 {half}">
      <geom name="cube" type="box" size="{half} {half} {half}" rgba="0.85 0.15 0.15 1"/>
    </body>
  </worldbody>
  <actuator>
    <position name="x" joint="x" kp="{p.kp}" kv="{p.kv}" forcerange="{-p.force_limit} {p.force_limit}"/>
    <position name="y" joint="y" kp="{p.kp}" kv="{p.kv}" forcerange="{-p.force_limit} {p.force_limit}"/>
    <position name="finger_left" joint="finger_left" kp="{p.finger_kp}"/>
    <position name="finger_right" joint="finger_right" kp="{p.finger_kp}"/>
  </actuator>
</mujoco>
"""


class SimModel:
    """A compiled scene plus the per-``MjData`` operations both the robot and the vec env use.

    Every function that changes a state takes the ``MjData``; a ``SimModel`` itself is never mutated
    after construction except :meth:`set_torque`, so one instance serves many ``MjData``.
    """

    def __init__(self, params: TaskParams | None = None, cameras: dict[str, tuple[int, int]] | None = None):
        self.params = params or TaskParams()
        self.substeps = self.params.substeps
        self.model = mujoco.MjModel.from_xml_string(build_mjcf(self.params, cameras))
        m = self.model
        q = {name: int(m.joint(name).qposadr[0]) for name in ("x", "y", "finger_left", "finger_right")}
        v = {name: int(m.joint(name).dofadr[0]) for name in ("x", "y")}
        self._qx, self._qy, self._qfl, self._qfr = q["x"], q["y"], q["finger_left"], q["finger_right"]
        self._vx, self._vy = v["x"], v["y"]
        self._mocap = int(m.body("cube").mocapid[0])
        self._cube_z = CUBE_SIZE / 2
        self.action_low = self.params.action_low
        self.action_high = self.params.action_high

    def make_data(self) -> mujoco.MjData:
        return mujoco.MjData(self.model)

    # ------------------------------------------------------------------ scene set-up
    def sample_start(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(end-effector start, cube position), metres, drawn from ``rng`` (the only randomness of the task)."""
        p = self.params
        ee = rng.uniform(-p.start_range, p.start_range, size=2)
        while True:
            cube = rng.uniform(-p.cube_range, p.cube_range, size=2)
            d = cube - ee
            if np.sqrt(d[0] * d[0] + d[1] * d[1]) >= p.min_start_distance:
                return ee, cube

    def reset(self, data: mujoco.MjData, ee: np.ndarray, cube: np.ndarray) -> None:
        """Arm at rest at ``ee`` holding it, gripper open, cube at ``cube``."""
        mujoco.mj_resetData(self.model, data)
        data.qpos[self._qx], data.qpos[self._qy] = ee
        data.qpos[self._qfl] = data.qpos[self._qfr] = FINGER_TRAVEL
        self.set_targets(data, np.array([ee[0], ee[1], 100.0]))
        data.mocap_pos[self._mocap] = (cube[0], cube[1], self._cube_z)
        mujoco.mj_forward(self.model, data)

    def move_cube(self, data: mujoco.MjData, cube: np.ndarray) -> None:
        data.mocap_pos[self._mocap] = (cube[0], cube[1], self._cube_z)

    # ------------------------------------------------------------------ control
    def clip_action(self, action: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
        """``[3]`` or ``[N, 3]`` targets clipped to the workspace and the gripper range; a NaN target keeps
        ``previous`` (the last one sent; without it, the range's centre / an open gripper)."""
        a = np.array(action, dtype=np.float64)
        bad = np.isnan(a)
        if bad.any():
            fallback = previous if previous is not None else np.broadcast_to([0.0, 0.0, 100.0], a.shape)
            a = np.where(bad, fallback, a)
        return np.clip(a, self.action_low, self.action_high)

    def set_targets(self, data: mujoco.MjData, target: np.ndarray) -> None:
        """Write clipped targets ``[x.pos m, y.pos m, gripper.pos %]`` to the servos."""
        finger = (target[2] * ((1 + 2 * FINGER_PRELOAD) / 100.0) - FINGER_PRELOAD) * FINGER_TRAVEL
        data.ctrl[0] = target[0]
        data.ctrl[1] = target[1]
        data.ctrl[2] = finger
        data.ctrl[3] = finger

    def targets(self, data: mujoco.MjData) -> np.ndarray:
        """The targets the servos hold now, in action units."""
        pct = (data.ctrl[2] / FINGER_TRAVEL + FINGER_PRELOAD) * (100.0 / (1 + 2 * FINGER_PRELOAD))
        return np.array([data.ctrl[0], data.ctrl[1], pct])

    def step(self, data: mujoco.MjData, nstep: int | None = None) -> None:
        """Advance ``nstep`` MuJoCo steps (default: one control step)."""
        mujoco.mj_step(self.model, data, nstep or self.substeps)

    def set_torque(self, enabled: bool) -> None:
        """Actuators on / off for every ``MjData`` of this model (the rails' damping always acts)."""
        if enabled:
            self.model.opt.disableflags &= ~int(mujoco.mjtDisableBit.mjDSBL_ACTUATION)
        else:
            self.model.opt.disableflags |= int(mujoco.mjtDisableBit.mjDSBL_ACTUATION)

    @property
    def torque_enabled(self) -> bool:
        return not self.model.opt.disableflags & int(mujoco.mjtDisableBit.mjDSBL_ACTUATION)

    # ------------------------------------------------------------------ observation and judgement
    def observe(self, data: mujoco.MjData, out: np.ndarray | None = None) -> np.ndarray:
        """``[7]`` float64: x.pos, y.pos, x.vel, y.vel, gripper.pos, cube.x, cube.y (see the module units)."""
        o = np.empty(7) if out is None else out
        qpos, qvel = data.qpos, data.qvel
        o[0] = qpos[self._qx]
        o[1] = qpos[self._qy]
        o[2] = qvel[self._vx]
        o[3] = qvel[self._vy]
        # the joint limits are soft (the preload presses ~2 % past them): report the range LeRobot grippers report
        o[4] = min(max((qpos[self._qfl] + qpos[self._qfr]) * (50.0 / FINGER_TRAVEL), 0.0), 100.0)
        cube = data.mocap_pos[self._mocap]
        o[5] = cube[0]
        o[6] = cube[1]
        return o

    def judge(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(closed, success) for observations ``[..., 7]``: the gripper is closed once its opening is at or
        below ``GRASP_THRESHOLD``; the grasp succeeds when the end-effector is then within ``success_radius``
        of the cube and slower than ``max_speed_at_grasp``."""
        p = self.params
        closed = obs[..., 4] <= GRASP_THRESHOLD
        dx, dy = obs[..., 0] - obs[..., 5], obs[..., 1] - obs[..., 6]
        near = dx * dx + dy * dy < p.success_radius**2
        slow = obs[..., 2] ** 2 + obs[..., 3] ** 2 < p.max_speed_at_grasp**2
        return closed, closed & near & slow

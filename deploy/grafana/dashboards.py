"""The Grafana dashboards, as data: `python deploy/render.py` writes them to deploy/grafana/dashboards/.

Written as Python rather than hand-edited JSON so every panel has the same shape (datasource
variable, units, legend) and the tests can walk every query. Queries filter on the `$robot_id`
variable and use `$__rate_interval`; the integration test evaluates each one against a real
Prometheus scraping a learner and two edges.
"""

from __future__ import annotations

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ROBOT = 'robot_id=~"$robot_id"'


def _target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def panel(
    title: str,
    targets: list[tuple[str, str]],
    *,
    unit: str = "short",
    kind: str = "timeseries",
    description: str = "",
    w: int = 12,
    h: int = 8,
    thresholds: list[tuple[float, str]] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    mappings: dict[int, tuple[str, str]] | None = None,
    options: dict | None = None,
) -> dict:
    """One panel; ``targets`` is [(PromQL, legend)]. Grid position is assigned by ``dashboard``.
    ``mappings``: value -> (text, color) shown instead of the number; ``options``: the panel type's own."""
    defaults: dict = {"unit": unit}
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if thresholds:
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in thresholds]}
    if mappings:
        defaults["mappings"] = [
            {
                "type": "value",
                "options": {
                    str(v): {"text": text, "color": color, "index": i}
                    for i, (v, (text, color)) in enumerate(mappings.items())
                },
            }
        ]
        defaults["color"] = {"mode": "thresholds"}
    out = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [_target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
        "gridPos": {"w": w, "h": h},
    }
    if kind == "timeseries":
        out["options"] = {
            "legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    if options:
        out["options"] = {**out.get("options", {}), **options}
    return out


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


def dashboard(uid: str, title: str, description: str, panels: list[dict], *, robot_variable: bool) -> dict:
    x = y = line_h = 0
    for i, p in enumerate(panels):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y = 0, y + line_h
            line_h = 0
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        p["id"] = i + 1
        x, line_h = x + w, max(line_h, h)
    variables = [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
            "options": [],
        }
    ]
    if robot_variable:
        variables.append(
            {
                "name": "robot_id",
                "label": "robot",
                "type": "query",
                "datasource": DATASOURCE,
                "query": {"query": "label_values(pirl_edge_policy_version, robot_id)", "refId": "robot_id"},
                "definition": "label_values(pirl_edge_policy_version, robot_id)",
                "includeAll": True,
                "allValue": ".*",
                "multi": True,
                "refresh": 2,
                "sort": 1,
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "options": [],
                "hide": 0,
            }
        )
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["pirl"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": variables},
        "panels": panels,
    }


def _quantiles(metric: str, by: str, selector: str = "") -> list[tuple[str, str]]:
    legend = "{{robot_id}} " if "robot_id" in by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{selector}[$__rate_interval])))",
            f"{legend}p{int(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


# robot mode's episode protocol (edge/robot_loop.py PHASES; a test keeps them equal): value of the
# "Episode phase" state timeline -> (phase, color)
PHASES = {
    1: ("reset", "blue"),
    2: ("wait", "yellow"),
    3: ("run", "green"),
    4: ("return", "purple"),
    5: ("estop", "red"),
}


def _rate_ratio(metric: str, sel: str, by: str = "robot_id") -> str:
    """Share of each robot's control ticks counted by ``metric`` (over ``$__rate_interval``)."""
    ticks = f"sum by (robot_id) (rate(pirl_edge_ticks_total{sel}[$__rate_interval]))"
    share = f"sum by ({by}) (rate({metric}{sel}[$__rate_interval]))"
    return f"{share} / {ticks}" if by == "robot_id" else f"{share} / on (robot_id) group_left () {ticks}"


def safety(sel: str) -> list[dict]:
    """Robot mode (pirl-edge --robot.type=...): the safety layer, the episode protocol, the session dataset.
    Edges that drive simulated envs export none of these series: their panels show no data."""
    phase_code = "\n  or ".join(
        f'(pirl_edge_episode_phase{{phase="{name}",{ROBOT}}} == 1) * {code}' for code, (name, _) in PHASES.items()
    )
    return [
        row("Safety (robot mode)"),
        panel(
            "E-stop latched",
            [(f"max by (robot_id) (pirl_edge_safety_estop_latched{sel})", "{{robot_id}}")],
            kind="stat",
            w=18,
            h=5,
            thresholds=[(None, "green"), (1, "red")],
            mappings={0: ("released", "green"), 1: ("LATCHED", "red")},
            options={"colorMode": "background", "graphMode": "none", "textMode": "value_and_name"},
            description="Per robot: LATCHED while its e-stop holds (no policy action reaches it until an operator "
            "releases it); alert PirlEdgeEStopLatched after 1 minute.",
        ),
        panel(
            "Robots e-stopped now",
            [("fleet:pirl_edge_safety_estops_latched:count", "robots")],
            kind="stat",
            w=6,
            h=5,
            thresholds=[(None, "green"), (1, "red")],
            description="Recording rule fleet:pirl_edge_safety_estops_latched:count (the whole fleet).",
        ),
        panel(
            "Episode phase",
            [(f"max by (robot_id) (\n    {phase_code}\n)", "{{robot_id}}")],
            kind="state-timeline",
            unit="none",
            w=24,
            h=7,
            mappings=PHASES,
            options={
                "mergeValues": True,
                "showValue": "auto",
                "alignValue": "left",
                "rowHeight": 0.8,
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "single", "sort": "none"},
            },
            description="The episode protocol per robot: reset (moving to the reset pose), wait (for the start), "
            "run (the policy acts), return (back to the reset pose), estop (latched). Empty: not in robot mode.",
        ),
        panel(
            "E-stops by source (1 h)",
            [(f"robot_id_source:pirl_edge_safety_estops:increase1h{sel}", "{{robot_id}}: {{source}}")],
            unit="none",
            minimum=0,
            description="E-stops latched in the last hour, by what latched them (key, http, sigusr1, ...). Recording "
            "rule robot_id_source:pirl_edge_safety_estops:increase1h; alert PirlEdgeEStopsFrequent at 3.",
        ),
        panel(
            "E-stop actions (1 h)",
            [(f"robot_id_action:pirl_edge_safety_estop_actions:increase1h{sel}", "{{robot_id}}: {{action}}")],
            unit="none",
            minimum=0,
            description="What each e-stop did to the motors: torque_off, hold, none (no observed position to hold) "
            "or failed (the robot call raised). Alert PirlEdgeEStopActionFailed on none or failed.",
        ),
        panel(
            "Clamped ticks",
            [(_rate_ratio("pirl_edge_safety_clamped_ticks_total", sel), "{{robot_id}}")],
            unit="percentunit",
            w=8,
            minimum=0,
            thresholds=[(None, "green"), (0.2, "red")],
            description="Share of ticks whose command the safety layer clamped to the action bounds: the policy "
            "pushes against them (alert PirlEdgeClampRateHigh over 20% for 10 minutes).",
        ),
        panel(
            "Jump-limited ticks",
            [(_rate_ratio("pirl_edge_safety_jump_limited_ticks_total", sel), "{{robot_id}}")],
            unit="percentunit",
            w=8,
            minimum=0,
            description="Share of ticks whose command was limited to safety.max_delta from the last one sent "
            "(only with safety.max_delta set).",
        ),
        panel(
            "Held ticks by reason",
            [
                (
                    _rate_ratio("pirl_edge_safety_held_ticks_total", sel, by="robot_id, reason"),
                    "{{robot_id}}: {{reason}}",
                )
            ],
            unit="percentunit",
            w=8,
            minimum=0,
            description="Share of ticks that repeated the last command: no_action (none ready in time), nonfinite "
            "(NaN or inf in the policy's action: alert PirlEdgeNonFiniteActions).",
        ),
        panel(
            "Episodes ended (1 h) by reason",
            [(f"robot_id_reason:pirl_edge_episodes:increase1h{sel}", "{{robot_id}}: {{reason}}")],
            unit="none",
            minimum=0,
            description="success, failure, time_limit, operator_end, estop, watchdog, stop. Recording rule "
            "robot_id_reason:pirl_edge_episodes:increase1h.",
        ),
        panel(
            "Watchdog trips (1 h)",
            [(f"sum by (robot_id) (increase(pirl_edge_safety_watchdog_trips_total{sel}[1h]))", "{{robot_id}}")],
            unit="none",
            minimum=0,
            thresholds=[(None, "green"), (1, "red")],
            description="Control-loop stalls: no tick for safety.watchdog_s (alert PirlEdgeWatchdogTripped).",
        ),
        panel(
            "Reset timeouts (1 h)",
            [(f"robot_id:pirl_edge_reset_timeouts:increase1h{sel}", "{{robot_id}}")],
            unit="none",
            minimum=0,
            thresholds=[(None, "green"), (1, "orange")],
            description="Moves to episode.reset_pose that did not arrive in episode.reset_timeout_s "
            "(alert PirlEdgeResetTimeouts).",
        ),
        panel(
            "Dataset frames dropped (1 h)",
            [(f"sum by (robot_id) (increase(pirl_edge_dataset_frames_dropped_total{sel}[1h]))", "{{robot_id}}")],
            unit="none",
            minimum=0,
            thresholds=[(None, "green"), (1, "orange")],
            description="Frames of the session dataset dropped because its writer fell behind "
            "(alert PirlEdgeDatasetFramesDropped).",
        ),
    ]


def people(sel: str) -> list[dict]:
    """The robots' people-in-the-loop panels: who decides outcomes, and how often people take over."""
    return [
        row("People in the loop (robot mode)"),
        panel(
            "Episode outcomes (1 h) by who decided",
            [
                (
                    f"sum by (robot_id, source, verdict) (increase(pirl_edge_episode_labels_total{sel}[1h]))",
                    "{{robot_id}}: {{source}} {{verdict}}",
                )
            ],
            unit="none",
            minimum=0,
            description="operator (a person's label), detector (the success detector), env (the robot's own "
            "verdict), time_limit; success, failure, abort (never trained on). --episode.outcome chooses the source.",
        ),
        panel(
            "Takeovers (1 h)",
            [(f"sum by (robot_id) (increase(pirl_edge_interventions_total{sel}[1h]))", "{{robot_id}}")],
            unit="none",
            minimum=0,
            w=8,
            description="Times a person took over with the teleoperator (--teleop.type).",
        ),
        panel(
            "Teleoperated ticks",
            [(_rate_ratio("pirl_edge_teleop_ticks_total", sel), "{{robot_id}}")],
            unit="percentunit",
            minimum=0,
            w=8,
            description="Share of ticks a person's teleoperator drove (through the safety layer).",
        ),
        panel(
            "A person drives now",
            [(f"max by (robot_id) (pirl_edge_intervening{sel})", "{{robot_id}}")],
            kind="stat",
            w=8,
            mappings={0: ("policy", "green"), 1: ("PERSON", "blue")},
            options={"colorMode": "background", "graphMode": "none", "textMode": "value_and_name"},
            description="PERSON while a takeover lasts (until the chunk boundary after the hand-back).",
        ),
    ]


def fleet() -> dict:
    sel = "{" + ROBOT + "}"
    panels = [
        row("Control"),
        panel(
            "Control rate per robot",
            [
                (f"pirl_edge_control_rate_hz{sel}", "{{robot_id}}"),
                (f"pirl_edge_control_target_hz{sel}", "{{robot_id}} target"),
            ],
            unit="hz",
            description="Ticks in the last second, and the rate the paced loop aims at (control.hz).",
        ),
        panel(
            "Robots under 90% of their target rate",
            [("fleet:pirl_edge_robots_under_target:count", "robots")],
            kind="stat",
            w=6,
            thresholds=[(None, "green"), (1, "red")],
            description="Recording rule fleet:pirl_edge_robots_under_target:count (deploy/prometheus).",
        ),
        panel(
            "Deadline misses",
            [
                (
                    f"sum by (robot_id) (rate(pirl_edge_tick_deadline_misses_total{sel}[$__rate_interval]))"
                    f" / sum by (robot_id) (rate(pirl_edge_ticks_total{sel}[$__rate_interval]))",
                    "{{robot_id}}",
                )
            ],
            unit="percentunit",
            w=6,
            minimum=0,
            description="Share of ticks that started late or had no action ready (alert over 1%).",
        ),
        panel(
            "Inference latency p50 / p95 / p99 per robot",
            _quantiles("pirl_edge_inference_latency_seconds", "robot_id, le", sel),
            unit="s",
            w=24,
            description="One chunk: prefix + K denoise steps on the robot's backend.",
        ),
        panel(
            "Backend in use",
            [(f"max by (robot_id, backend) (pirl_edge_backend_info{sel}) == 1", "{{robot_id}}: {{backend}}")],
            kind="table",
            w=12,
            description="1 for the backend each robot serves with.",
        ),
        panel(
            "Backend fallbacks (1 h)",
            [
                (
                    f"sum by (robot_id, backend) (increase(pirl_edge_backend_fallbacks_total{sel}[1h]))",
                    "{{robot_id}}: {{backend}} failed",
                )
            ],
            kind="stat",
            w=12,
            thresholds=[(None, "green"), (1, "orange")],
            description="A requested backend that could not load (label: the one that failed).",
        ),
        *safety(sel),
        *people(sel),
        row("Sync with the learner"),
        panel(
            "Seconds since last sync",
            [
                (f"max by (robot_id) (pirl_edge_seconds_since_last_sync{sel})", "{{robot_id}} (edge)"),
                (
                    f"time() - max by (robot_id) (pirl_learner_robot_last_seen_timestamp_seconds{sel})",
                    "{{robot_id}} (learner's last contact)",
                ),
            ],
            unit="s",
            minimum=0,
            thresholds=[(None, "green"), (120, "red")],
            description="The edge's gauge while it runs; the learner's view keeps growing when an edge is stopped. "
            "Sync-stale alert over 120 s.",
        ),
        panel(
            "Sync latency p50 / p95 / p99 (publish -> serving)",
            _quantiles("pirl_edge_sync_latency_seconds", "robot_id, le", sel),
            unit="s",
            description="From the learner publishing a version to the edge serving it (includes clock offset).",
        ),
        panel(
            "Policy version per robot",
            [
                (f"max by (robot_id) (pirl_edge_policy_version{sel})", "{{robot_id}}"),
                ("max(pirl_learner_policy_version)", "learner"),
            ],
            unit="none",
            description="What each robot runs, against the learner's current version.",
        ),
        panel(
            "Versions behind the learner",
            [(f"robot_id:pirl_edge_policy_version_lag{sel}", "{{robot_id}}")],
            unit="none",
            minimum=0,
            description="Recording rule robot_id:pirl_edge_policy_version_lag.",
        ),
        panel(
            "Policy swaps and refused versions (1 h)",
            [
                (f"sum by (robot_id) (increase(pirl_edge_policy_swaps_total{sel}[1h]))", "{{robot_id}} swaps"),
                (f"sum by (robot_id) (increase(pirl_edge_swap_failures_total{sel}[1h]))", "{{robot_id}} refused"),
            ],
            unit="none",
            w=24,
        ),
        row("Spool and upload"),
        panel(
            "Spooled records",
            [
                (f"max by (robot_id) (pirl_edge_spool_records{sel})", "{{robot_id}}"),
                ("fleet:pirl_edge_spool_records:sum", "fleet"),
            ],
            unit="none",
            w=6,
            description="Unacked rollout records on each robot's disk.",
        ),
        panel(
            "Oldest unacked record",
            [(f"max by (robot_id) (pirl_edge_spool_oldest_record_age_seconds{sel})", "{{robot_id}}")],
            unit="s",
            w=6,
            thresholds=[(None, "green"), (900, "red")],
        ),
        panel("Spool size", [(f"max by (robot_id) (pirl_edge_spool_bytes{sel})", "{{robot_id}}")], unit="bytes", w=6),
        panel(
            "Quarantined spool files",
            [
                (f"max by (robot_id) (pirl_edge_spool_quarantine_files{sel})", "{{robot_id}} in quarantine/"),
                (
                    f"sum by (robot_id) (increase(pirl_edge_spool_quarantined_total{sel}[1h]))",
                    "{{robot_id}} moved (1 h)",
                ),
            ],
            unit="none",
            w=6,
            minimum=0,
            thresholds=[(None, "green"), (1, "red")],
            description="Records lost to corruption (torn or corrupted files), kept in <spool-dir>/quarantine/ "
            "until removed; alert PirlEdgeSpoolQuarantine while any are there.",
        ),
        panel(
            "Records sent / acked per second",
            [
                (f"sum by (robot_id) (rate(pirl_edge_records_sent_total{sel}[$__rate_interval]))", "{{robot_id}} sent"),
                (
                    f"sum by (robot_id) (rate(pirl_edge_records_acked_total{sel}[$__rate_interval]))",
                    "{{robot_id}} acked",
                ),
            ],
            unit="ops",
            w=24,
        ),
    ]
    return dashboard(
        "pirl-fleet",
        "PI-RL fleet",
        "Robots: control rate, inference latency, safety and episodes (robot mode), sync with the learner, spool.",
        panels,
        robot_variable=True,
    )


def learner() -> dict:
    panels = [
        row("Intake"),
        panel(
            "Learner up",
            [('max(up{job="pirl-learner"})', "up")],
            kind="stat",
            w=4,
            thresholds=[(None, "red"), (1, "green")],
        ),
        panel("Connected robots", [("max(pirl_learner_connected_robots)", "robots")], kind="stat", w=4),
        panel("Policy version", [("max(pirl_learner_policy_version)", "version")], kind="stat", w=4),
        panel(
            "Episodes waiting for the next update",
            [("max(pirl_learner_episodes_pending)", "episodes")],
            kind="stat",
            w=4,
        ),
        panel(
            "Rollouts accepted per second (fleet)",
            [("fleet:pirl_learner_rollouts_accepted:rate5m", "5 min rate")],
            kind="stat",
            unit="ops",
            w=8,
        ),
        panel(
            "Rollouts per second",
            [
                (
                    "sum by (robot_id) (rate(pirl_learner_rollouts_accepted_total[$__rate_interval]))",
                    "{{robot_id}} accepted",
                ),
                (
                    "sum by (reason) (rate(pirl_learner_rollouts_rejected_total[$__rate_interval]))",
                    "rejected: {{reason}}",
                ),
                ("sum(rate(pirl_learner_rollouts_duplicate_total[$__rate_interval]))", "duplicates"),
            ],
            unit="ops",
            w=24,
        ),
        row("Updates"),
        panel(
            "Update duration p50 / p95 / p99",
            _quantiles("pirl_learner_update_duration_seconds", "le"),
            unit="s",
            description="One PI-RL (PPO / GRPO) update.",
        ),
        panel(
            "Export + checkpoint + publish duration p50 / p95 / p99",
            _quantiles("pirl_learner_publish_duration_seconds", "le"),
            unit="s",
            description="ONNX export (and TensorRT engine where enabled), checkpoint, publish.",
        ),
        row("PPO diagnostics (last update)"),
        panel(
            "Approx KL and clip fraction",
            [("max(pirl_learner_approx_kl)", "approx KL"), ("max(pirl_learner_clip_fraction)", "clip fraction")],
            w=8,
        ),
        panel(
            "Losses",
            [("max(pirl_learner_policy_loss)", "policy loss"), ("max(pirl_learner_value_loss)", "value loss")],
            w=8,
        ),
        panel(
            "Entropy and explained variance",
            [("max(pirl_learner_entropy)", "entropy"), ("max(pirl_learner_explained_variance)", "explained variance")],
            w=8,
        ),
        row("People in the loop"),
        panel(
            "BC loss",
            [("max(pirl_learner_bc_loss)", "flow-matching BC loss of the last update")],
            w=8,
            description="The BC term of the actor loss (algorithm.bc_coef > 0) on takeovers, offline demos and, "
            "with bc.successes, the policy's own successes.",
        ),
        panel(
            "BC samples by source",
            [("sum by (source) (rate(pirl_learner_bc_samples_total[$__rate_interval]))", "{{source}}")],
            w=8,
            minimum=0,
            description="intervention (teleoperated actions), success (self-imitation), offline (--offline_dataset).",
        ),
        panel(
            "Intervened steps and aborted episodes",
            [
                (
                    "sum(rate(pirl_learner_intervened_steps_total[$__rate_interval]))",
                    "intervened macro-steps (never PPO)",
                ),
                ("sum(rate(pirl_learner_aborted_episodes_total[$__rate_interval]))", "aborted episodes (dropped)"),
            ],
            w=8,
            minimum=0,
        ),
        panel(
            "Off-policy steering",
            [
                ("max(pirl_learner_steer_q_loss)", "critic loss (returns-to-go)"),
                ("max(pirl_learner_steer_head_q)", "head Q (min over critics)"),
                ("max(pirl_learner_steer_std)", "steering std of x_1"),
            ],
            w=24,
            description="algorithm.steer_update=q: the noise critic's fit, the Q the steering head climbs (above the "
            "returns it is fitted on means the head found x_1 the critics overrate) and the std of the head's x_1 "
            "(1 is the N(0, I) the flow policy was trained from; it falls as the head narrows the noise).",
        ),
        row("Success"),
        panel(
            "Success rate",
            [
                ("max(pirl_learner_rollout_success_ratio)", "rollouts (stochastic)"),
                ("max(pirl_learner_eval_success_ratio)", "evaluation (deterministic)"),
            ],
            unit="percentunit",
            minimum=0,
            maximum=1,
        ),
        panel("Episode return", [("max(pirl_learner_episode_return)", "mean return of the last batch")]),
    ]
    return dashboard(
        "pirl-learner",
        "PI-RL learner",
        "Rollout intake, update and export durations, PPO diagnostics, success.",
        panels,
        robot_variable=False,
    )


def build() -> dict[str, dict]:
    """File name -> dashboard JSON model."""
    return {"pirl-fleet.json": fleet(), "pirl-learner.json": learner()}

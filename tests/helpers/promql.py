"""Every PromQL expression the deployment ships (alert and recording rules, dashboard panels and
variables) and the metric names they read; shared by the static and the live Prometheus tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
# pirl_* metrics and recording-rule outputs (level:pirl_metric:operations)
_NAME = re.compile(r"(?<![\w:$.])((?:[a-z_]+:)?pirl_[a-z0-9_]+(?::[a-z0-9_]+)*)")


def rules() -> list[dict]:
    return [r for path in RULES for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) for every panel target and query variable."""
    out = []
    for path in DASHBOARDS:
        model = json.loads(path.read_text())
        for panel in model["panels"]:
            for target in panel.get("targets", []):
                out.append((path.name, panel["title"], target["expr"]))
        for var in model["templating"]["list"]:
            if var["type"] == "query":
                out.append((path.name, f"variable {var['name']}", var["definition"]))
    return out


def expressions() -> list[str]:
    return [r["expr"] for r in rules()] + [q for _, _, q in dashboard_queries()]


def names(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


def used_names() -> set[str]:
    return set().union(*(names(e) for e in expressions()))


def instant(expr: str) -> str:
    """A dashboard query made evaluable outside Grafana: variables replaced by what Grafana sends."""
    expr = expr.replace("$__rate_interval", "15s").replace("$robot_id", ".*")
    if expr.startswith("label_values("):  # a Grafana variable query: the series it reads
        expr = expr[len("label_values(") :].rsplit(",", 1)[0]
    return expr

#!/usr/bin/env python3
"""Container healthcheck of an edge: /metrics answers and, on a robot, the control loop is ticking.

    healthcheck-edge.py [--url http://127.0.0.1:9101/metrics] [--wait 1.5]

Scrapes twice, --wait seconds apart. Healthy when both scrapes answer and pirl_edge_ticks_total
increased between them (a paced loop ticks at least once a second); an edge that exports no ticks
(the unpaced simulation loop) is healthy when /metrics answers. A stalled loop freezes the
control-rate gauge at its last value, which is why ticks are compared rather than that gauge.
Exit 0 healthy, 1 not (one line says why), 2 for a usage error. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import urllib.error
import urllib.request

TICKS = re.compile(r"^pirl_edge_ticks_total\{[^}]*\}\s+(\S+)", re.MULTILINE)


def ticks(url: str, timeout: float) -> float | None:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode("utf-8", "replace")
    values = [float(v) for v in TICKS.findall(text)]
    return sum(values) if values else None


def main() -> None:
    port = os.environ.get("PIRL_METRICS_PORT", "9101")
    p = argparse.ArgumentParser(
        prog="healthcheck-edge.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--url", default=f"http://127.0.0.1:{port}/metrics", help="the edge's /metrics (default: PIRL_METRICS_PORT)"
    )
    p.add_argument("--wait", type=float, default=1.5, help="seconds between the two scrapes")
    p.add_argument("--timeout", type=float, default=5.0)
    args = p.parse_args()
    if args.wait <= 0:
        p.error("--wait must be > 0")
    try:
        first = ticks(args.url, args.timeout)
        time.sleep(args.wait)
        second = ticks(args.url, args.timeout)
    except (urllib.error.URLError, OSError) as e:
        print(f"unhealthy: {args.url}: {e}")
        sys.exit(1)
    if first is None or second is None:
        print(f"healthy: {args.url} answers (no control ticks exported: simulation mode)")
        sys.exit(0)
    if second <= first:
        print(f"unhealthy: control loop stalled ({first:.0f} ticks, none in {args.wait:g} s)")
        sys.exit(1)
    print(f"healthy: {second - first:.0f} ticks in {args.wait:g} s")
    sys.exit(0)


if __name__ == "__main__":
    main()

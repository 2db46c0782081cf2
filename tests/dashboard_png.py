"""Render deploy/monitoring/dashboards/mx-sidecar.json with matplotlib from a real Prometheus' query_range data.

Grafana cannot be installed on these machines, so this draws the same panels (same queries, same layout) from
the fleet run of tests/fleet_run.py: `make dashboard-png` writes docs/dashboard.png.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

from tests.fleet_run import fleet
from tests.prom import NAMESPACE, Prometheus
from tests.tooling import DEPLOY

DASHBOARD = DEPLOY / "monitoring" / "dashboards" / "mx-sidecar.json"
UNITS = {"Bps": (1e6, "MB/s"), "bytes": (1e6, "MB"), "s": (1.0, "s"), "short": (1.0, "")}


def _legend(fmt: str, metric: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt) or "value"


def render(prom: Prometheus, t0: float, t1: float, out: Path) -> int:
    """Draw every panel over [t0, t1]; returns how many panels had data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(18, rows * 0.5))
    top_frac = 0.96  # room for the title
    fig.suptitle(f"{dash['title']} (Grafana dashboard, drawn from a real Prometheus: namespace {NAMESPACE}, "
                 f"{t1 - t0:.0f} s run of real sidecars)", fontsize=13)
    drawn = 0
    step = max(1.0, (t1 - t0) / 300)
    for p in panels:
        g = p["gridPos"]
        # The panel's Grafana grid cell, inset for its title (above) and tick labels (below, left).
        cell_h = top_frac / rows
        ax = fig.add_axes((g["x"] / 24 + 0.035, top_frac - (g["y"] + g["h"]) * cell_h + 0.022,
                           g["w"] / 24 - 0.045, g["h"] * cell_h - 0.045))
        ax.set_title(p["title"], fontsize=10, loc="left")
        scale, unit = UNITS.get(p["fieldConfig"]["defaults"]["unit"], (1.0, ""))
        series: list[tuple[str, list[float], list[float]]] = []
        for t in p["targets"]:
            expr = t["expr"].replace("$namespace", NAMESPACE).replace("$model", ".*")
            for s in prom.query_range(expr, t0, t1, step):
                xs = [float(v[0]) - t0 for v in s["values"]]
                ys = [float(v[1]) / scale for v in s["values"]]
                series.append((_legend(t.get("legendFormat", ""), s["metric"]), xs, ys))
        drawn += bool(series)
        if p["type"] == "stat":
            ax.axis("off")
            text = "\n".join(f"{name}: {ys[-1]:g}" for name, _, ys in series) or "no data"
            ax.text(0.02, 0.5, text, fontsize=13, va="center", transform=ax.transAxes)
            continue
        for name, xs, ys in series:
            ax.plot(xs, ys, label=name, linewidth=1.5, drawstyle="steps-post")
        ax.set_xlim(0, t1 - t0)
        top = max((max(ys) for _, _, ys in series), default=1.0)
        ax.set_ylim(0, top * 1.25 if top > 0 else 1.0)  # every metric here is >= 0
        ax.tick_params(labelsize=8)
        if g["y"] + g["h"] == rows:
            ax.set_xlabel("seconds into the run", fontsize=8)
        if unit:
            ax.set_ylabel(unit, fontsize=8)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7, loc="upper left", ncol=2, framealpha=0.6)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return drawn


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "docs/dashboard.png")
    with tempfile.TemporaryDirectory(prefix="mx-dash-") as tmp, fleet(Path(tmp), hold_s=15) as run:
        drawn = render(run.prom, run.t_start, run.t_end, out)
    print(f"{out}: {drawn} panels with data")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Draws bench/loop.png from a loop_bench.py result file.

    python bench/chart.py bench/results/loop.json bench/loop.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    with open(src) as f:
        r = json.load(f)
    loops = list(r["call_soon"])
    colors = {"asyncio": "#999999", "uvloop": "#4c72b0", "rloop": "#dd8452", "uringloop": "#55a868"}
    echo_keys = list(r["echo"])
    fig, axes = plt.subplots(1, 2 + len(echo_keys), figsize=(4 * (2 + len(echo_keys)), 4))
    panels = [("call_soon (M calls/s, higher is better)", [r["call_soon"][n] / 1e6 for n in loops]),
              ("timer schedule+cancel (M/s, higher is better)", [r["timers"][n] / 1e6 for n in loops])]
    panels += [(f"sock echo {k}: server CPU µs per round trip\n(lower is better)",
                [r["echo"][k][n]["cpu_us_per_rt"] for n in loops]) for k in echo_keys]
    for ax, (title, values) in zip(axes, panels):
        ax.bar(loops, values, color=[colors.get(n, "#333333") for n in loops])
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Event-loop micro-benchmarks ({r['when']}, Python {r['python']}, Linux {r['kernel']}, "
                 f"server pinned to core 0, client to core 1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])

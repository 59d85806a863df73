"""Plot searched schedules (tokens per layer) from their files: docs/results/schedules.png.

    python scripts/plot_schedules.py runs/search/*.json --out docs/results/schedules.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--out", default="schedules.png")
    args = p.parse_args()
    fig, ax = plt.subplots(figsize=(6, 4))
    for f in args.files:
        data = json.loads(Path(f).read_text())
        counts = data["counts"]
        label = f"{Path(f).stem}: {sum(counts) / len(counts):.1f} equivalent"
        ax.step(range(len(counts)), counts, where="post", marker="o", label=label)
    ax.set(xlabel="LLM layer", ylabel="visual tokens per image", title="searched schedules (toy model)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()

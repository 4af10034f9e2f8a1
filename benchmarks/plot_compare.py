"""Plot a ``compare_peft.py`` result: tokens/s and peak GPU memory per configuration, ours next to PEFT's.

    pip install matplotlib
    python benchmarks/plot_compare.py benchmarks/results/2026-12-01-qlora-compile/compare.json --out plot.png
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result", help="JSON written by compare_peft.py")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit(f"plot_compare.py needs matplotlib ({err}); install it with `pip install matplotlib`.") from None
    with open(args.result) as handle:
        result = json.load(handle)
    rows = [(name, r) for name, r in result.items() if isinstance(r, dict) and "tokens_per_s" in r]
    if not rows:
        raise SystemExit(f"{args.result} holds no training configurations (no 'tokens_per_s' entries).")
    names = [name for name, _ in rows]
    colors = ["tab:orange" if name.startswith("ours") else "tab:blue" for name in names]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.6), sharey=True)
    speed.barh(names, [r["tokens_per_s"] for _, r in rows], color=colors)
    speed.set_xlabel("tokens/s (higher is better)")
    for y, (_, r) in enumerate(rows):
        speed.text(r["tokens_per_s"], y, f" {r['tokens_per_s']:,.0f}  ({r['mfu']:.0%} MFU)", va="center", fontsize=8)
    memory.barh(names, [r["peak_gib"] for _, r in rows], color=colors)
    memory.set_xlabel("peak GPU memory, GiB (lower is better)")
    for y, (_, r) in enumerate(rows):
        memory.text(r["peak_gib"], y, f" {r['peak_gib']:.1f}", va="center", fontsize=8)
    speed.invert_yaxis()
    versions = result.get("versions", {})
    fig.suptitle(f"QLoRA, Llama-2-7B shape, batch 2 x 2048 on {versions.get('gpu', 'GPU')}: lightning_lora (orange) vs PEFT (blue); "
                 f"torch {versions.get('torch', '?')}, bitsandbytes {versions.get('bitsandbytes', '?')}, peft {versions.get('peft', '?')}", fontsize=9)
    speed.set_xlim(0, max(r["tokens_per_s"] for _, r in rows) * 1.35)
    memory.set_xlim(0, max(r["peak_gib"] for _, r in rows) * 1.2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Loss curves from a train_log.jsonl as a self-contained SVG (no plotting library needed on CPU machines)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_log(path: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, heldout = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if "loss" in r and "step" in r:
            train.append((r["step"], r["loss"]))
        if "heldout_loss" in r:
            heldout.append((r["step"], r["heldout_loss"]))
    return train, heldout


def read_load(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Per MoE layer: max/mean expert load over the training steps (1.0 = perfectly balanced)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        for i, v in enumerate(r.get("expert_load_max_over_mean") or []):
            series.setdefault(f"MoE layer {i + 1}", []).append((r["step"], v))
    return series


def loss_svg(series: dict[str, list[tuple[int, float]]], title: str, width: int = 720, height: int = 420,
             ylabel: str = "loss (nats/token)") -> str:
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]
    pts = [p for s in series.values() for p in s]
    if not pts:
        raise ValueError("no loss records to plot")
    x_max = max(x for x, _ in pts)
    y_lo = math.floor(min(y for _, y in pts) * 2) / 2
    y_hi = math.ceil(max(y for _, y in pts) * 2) / 2
    y_hi = y_hi if y_hi > y_lo else y_lo + 1
    left, right, top, bottom = 60, 20, 40, 50
    W, H = width - left - right, height - top - bottom

    def px(x, y):
        return left + W * x / max(1, x_max), top + H * (1 - (y - y_lo) / (y_hi - y_lo))

    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
          f'<rect width="{width}" height="{height}" fill="white"/>',
          f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{title}</text>',
          f'<rect x="{left}" y="{top}" width="{W}" height="{H}" fill="none" stroke="#444"/>']
    n_y = int(round((y_hi - y_lo) / 0.5))
    for i in range(n_y + 1):
        y = y_lo + i * 0.5
        _, yy = px(0, y)
        el.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{left + W}" y2="{yy:.1f}" stroke="#ddd"/>')
        el.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{y:.1f}</text>')
    for i in range(6):
        x = x_max * i / 5
        xx, _ = px(x, y_lo)
        el.append(f'<text x="{xx:.1f}" y="{top + H + 18}" text-anchor="middle">{int(x)}</text>')
    el.append(f'<text x="{left + W / 2}" y="{height - 10}" text-anchor="middle">step</text>')
    el.append(f'<text x="16" y="{top + H / 2}" text-anchor="middle" transform="rotate(-90 16 {top + H / 2})">{ylabel}</text>')
    for i, (name, s) in enumerate(series.items()):
        c = colors[i % len(colors)]
        path = " ".join(f"{px(x, y)[0]:.1f},{px(x, y)[1]:.1f}" for x, y in s)
        el.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="1.6"/>')
        if len(s) < 40:
            el.extend(f'<circle cx="{px(x, y)[0]:.1f}" cy="{px(x, y)[1]:.1f}" r="3" fill="{c}"/>' for x, y in s)
        el.append(f'<line x1="{left + W - 170}" y1="{top + 18 + 18 * i}" x2="{left + W - 145}" y2="{top + 18 + 18 * i}" stroke="{c}" stroke-width="2"/>')
        el.append(f'<text x="{left + W - 140}" y="{top + 22 + 18 * i}">{name}</text>')
    el.append("</svg>")
    return "\n".join(el) + "\n"

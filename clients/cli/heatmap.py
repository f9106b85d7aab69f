"""Terminal pictures for the swarm tier: a pheromone heatmap and a flock's
headings, drawn with rich (used by the CLI and by make run)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.text import Text

# Faint to strong: a glyph and a colour per level, so the picture reads in a
# plain log as well as in a colour terminal.
GLYPHS = " .:-=+*#%@"
COLOURS = [
    "grey15",
    "#3b0f70",
    "#641a80",
    "#8c2981",
    "#b73779",
    "#de4968",
    "#f7705c",
    "#fe9f6d",
    "#fecf92",
    "#fcfdbf",
]
ARROWS = "→↗↑↖←↙↓↘"


def level(value: float, top: float, log_scale: bool) -> int:
    """0 for nothing, 1..len(GLYPHS)-1 by the value's share of ``top``."""
    if top <= 0 or value <= 0:
        return 0
    share = math.log1p(value) / math.log1p(top) if log_scale else value / top
    return 1 + min(int(share * (len(GLYPHS) - 1)), len(GLYPHS) - 2)


def heatmap(values: Sequence[float], columns: int, rows: int, *, log_scale: bool = True) -> Text:
    """``rows`` x ``columns`` values (row 0 first) as one character each, row 0
    at the bottom (y grows upward)."""
    top = max(values, default=0.0)
    text = Text()
    for row in range(rows - 1, -1, -1):
        for col in range(columns):
            i = level(values[row * columns + col], top, log_scale)
            text.append(GLYPHS[i], style=COLOURS[i])
        text.append("\n")
    return text


def flock_picture(
    x: Sequence[float],
    y: Sequence[float],
    vx: Sequence[float],
    vy: Sequence[float],
    width: float,
    height: float,
    *,
    columns: int = 60,
    rows: int = 20,
) -> Text:
    """Each boid as an arrow along its heading (y grows upward); where boids
    share a character cell, the last one drawn shows."""
    grid = [[" "] * columns for _ in range(rows)]
    for px, py, dx, dy in zip(x, y, vx, vy, strict=True):
        col = min(int(px / width * columns), columns - 1)
        row = min(int(py / height * rows), rows - 1)
        angle = math.atan2(dy, dx)
        grid[rows - 1 - row][col] = ARROWS[round(angle / (math.pi / 4)) % 8]
    text = Text()
    border = "+" + "-" * columns + "+\n"
    text.append(border, style="dim")
    for line in grid:
        text.append("|", style="dim")
        text.append("".join(line), style="bold cyan")
        text.append("|\n", style="dim")
    text.append(border, style="dim")
    return text


def bar(value: float, width: int = 30) -> str:
    """A bar for a number in [0, 1]."""
    filled = round(min(max(value, 0.0), 1.0) * width)
    return "█" * filled + "·" * (width - filled)

"""Size presets for the generator (refiners + LI-DiT backbone), in one registry.

`LI-DiT-1B` and `LI-DiT-10B` follow the paper (depth 28 / width 1152 / 16 heads and depth 48 / width 2816 /
44 heads). `tiny`, `S` and `B` are ours, for CPU tests, the quickstart and small GPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """Backbone and refiner sizes; everything else about the generator comes from its config."""

    dim: int
    depth: int
    heads: int
    refiner_depth: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2


PRESETS: dict[str, Preset] = {
    "tiny": Preset(dim=96, depth=4, heads=4),
    "S": Preset(dim=384, depth=12, heads=6),
    "B": Preset(dim=768, depth=12, heads=12),
    "LI-DiT-1B": Preset(dim=1152, depth=28, heads=16),
    "LI-DiT-10B": Preset(dim=2816, depth=48, heads=44),
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name with a helpful error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None

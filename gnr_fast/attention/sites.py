"""Where in the UNet a capture records: the feature sites and the self-attention layer ranges."""

from __future__ import annotations

from enum import Enum


class FeatureSite(str, Enum):
    """UNet module outputs a feature guider compares (DESIGN.md §4)."""

    UP_LAST = "up_blocks[-1]"  # appearance, new_features=true
    CONV_NORM_OUT = "conv_norm_out"  # appearance, new_features=false
    UP = "up_blocks[1].resnets[1]"  # features_map_l2 block='up'
    MID = "mid_block"  # features_map_l2 block='mid'
    DOWN = "down_blocks[1].resnets[1]"  # features_map_l2 block='down'


LayerRange = tuple[int, int]
"""A half-open ``(start, end)`` range of self-attention layers of one block group, in forward order."""

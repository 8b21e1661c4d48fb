"""Pure plot functions: plain data (lists, dicts, floats) in, a plotly figure out.

Nothing here imports torch, gradio or dsv3, so every figure can be tested with synthetic data in
the shapes of docs/API_CONTRACT.md. Every figure sets an explicit height: a gr.Plot without one
collapses or jumps while the page lays out.

Modules: base (colours, layout, formats), model, routing, rotary."""

from .base import (
    BASE_COLOR,
    CHANGED_COLOR,
    COLORS,
    DEAD_COLOR,
    DENSE_COLOR,
    GROUP_COLORS,
    GROUP_NAMES,
    LAYER_GROUPS,
    LOAD_COLORBAR,
    LOAD_SCALE,
    MODEL_GROUPS,
    MOE_COLOR,
    OVERRIDE_FILL,
    YARN_COLOR,
    empty,
    human,
)
from .model import TYPE_COLORS, architecture, layer_map, params_by_group, shape_trace
from .rotary import rotary_freqs, rotary_tables
from .routing import (
    BALANCE_METRICS,
    bias_effect,
    expert_heatmap,
    expert_load,
    group_loads,
    indexer_mask,
    router_scores,
    routing_balance,
)

__all__ = [
    "COLORS",
    "DENSE_COLOR",
    "MOE_COLOR",
    "OVERRIDE_FILL",
    "CHANGED_COLOR",
    "DEAD_COLOR",
    "BASE_COLOR",
    "YARN_COLOR",
    "LAYER_GROUPS",
    "MODEL_GROUPS",
    "GROUP_COLORS",
    "GROUP_NAMES",
    "LOAD_SCALE",
    "empty",
    "human",
    "LOAD_COLORBAR",
    "layer_map",
    "params_by_group",
    "TYPE_COLORS",
    "shape_trace",
    "architecture",
    "expert_heatmap",
    "expert_load",
    "group_loads",
    "BALANCE_METRICS",
    "routing_balance",
    "router_scores",
    "bias_effect",
    "indexer_mask",
    "rotary_freqs",
    "rotary_tables",
]

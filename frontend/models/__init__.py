"""cutegrad.models: the reference workloads of DESIGN.md as plain nn.Module code.

    GPT    decoder-only causal transformer (reverse, minigpt, gpt2-small)
    ViT    vision transformer with several averaged class tokens (vit)

`PRESETS[name]` holds the paper's configuration of each workload (model
config, batch size, optimizer, schedule); `CPU_PRESETS[name]` the scaled-down
one `cutegrad train` uses on a CPU. `build(name)` makes the model of a preset, `build_model(config)` the model of a config.
"""
from dataclasses import replace

from .blocks import MLP, Block, SelfAttention
from .gpt import GPT, GPTConfig
from .vit import PatchEmbed, ViT, ViTConfig
from .presets import CPU_PRESETS, PRESETS, WORKLOADS, OptimizerConfig, Preset


def build_model(config):
    """GPT for a GPTConfig, ViT for a ViTConfig."""
    if isinstance(config, GPTConfig):
        return GPT(config)
    if isinstance(config, ViTConfig):
        return ViT(config)
    raise TypeError(f"build_model: expected a GPTConfig or ViTConfig, got {type(config).__name__}")


def build(name, cpu=False, **config_overrides):
    """The model of workload `name` (CPU-scaled with cpu=True), with config fields overridden."""
    table = CPU_PRESETS if cpu else PRESETS
    if name not in table:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(table)}")
    return build_model(replace(table[name].model, **config_overrides))


__all__ = ["GPT", "GPTConfig", "ViT", "ViTConfig", "PatchEmbed", "Block", "SelfAttention", "MLP", "PRESETS",
           "CPU_PRESETS", "WORKLOADS", "OptimizerConfig", "Preset", "build", "build_model"]

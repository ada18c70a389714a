"""Named training presets for the reference workloads (DESIGN.md's table).

`PRESETS[name]` is the paper-sized configuration meant for a GPU;
`CPU_PRESETS[name]` is what `cutegrad train` runs on a CPU: the same
workload scaled down (model size, batch, steps) so it finishes in minutes on
two cores. The reverse workload keeps its model and task exactly and only
trains with a smaller batch for fewer steps: the plateau escape takes about
the same number of steps at batch 32 as at 64 (180-300 in PyTorch runs of
four seeds), and the final decay settles the noisier batch-32 solution
(all four seeds >= 0.996 exact-sequence accuracy at step 450).

SGD for reverse uses momentum 0.9: DESIGN.md fixes the learning rate (0.1)
but not the momentum, and plain SGD at lr 0.1 needs several times more steps
to solve the task. Its schedule is warmup-stable-decay: reversal training
sits on a loss plateau (ln 34, chance) until the model discovers
position-based attention, then drops to ~0 within a few dozen steps; a
cosine decay from the start lowers the lr during the plateau and delays the
escape, while a flat lr followed by a short final decay escapes early and
then settles.
"""
from dataclasses import asdict, dataclass, replace
from typing import Optional, Tuple, Union

from .gpt import GPTConfig
from .vit import ViTConfig


@dataclass(frozen=True)
class OptimizerConfig:
    name: str  # "sgd" or "adamw"
    lr: float
    momentum: float = 0.0  # SGD
    betas: Tuple[float, float] = (0.9, 0.999)  # AdamW
    eps: float = 1e-8
    weight_decay: float = 0.0  # AdamW: applied to matrices and embeddings only, never to biases and norm gains

    def to_dict(self):
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    """Everything `cutegrad train` needs to know about one workload."""

    workload: str  # "reverse", "vit", "minigpt" or "gpt2-small"
    model: Union[GPTConfig, ViTConfig]
    batch_size: int
    steps: int
    optimizer: OptimizerConfig
    clip_grad_norm: Optional[float] = None
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps to lr
    min_lr_ratio: float = 0.1  # the decay ends at min_lr_ratio * lr
    # After warmup: "cosine" decays over all remaining steps; "wsd" (warmup-stable-decay) holds the lr and
    # decays over the last decay_fraction of the steps; "constant" holds it.
    schedule: str = "cosine"
    decay_fraction: float = 0.25
    tokenizer: Optional[str] = None  # text workloads: "bpe" or "char"
    tokenizer_vocab: int = 0  # text workloads with "bpe": the BPE vocabulary trained (<= model vocab_size)
    eval_examples: int = 1000  # reverse: held-out sequences; vit: test images; text: validation windows
    note: str = ""  # how a CPU preset differs from the full one

    @property
    def model_kind(self):
        return "vit" if isinstance(self.model, ViTConfig) else "gpt"

    def with_overrides(self, **changes):
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self):
        d = asdict(self)
        d["model_kind"] = self.model_kind
        return d


PRESETS = {
    "reverse": Preset(
        workload="reverse",
        model=GPTConfig(vocab_size=36, block_size=64, n_layer=2, n_head=4, n_embd=128),
        batch_size=64, steps=1000,
        optimizer=OptimizerConfig("sgd", lr=0.1, momentum=0.9),
        warmup_steps=20, schedule="wsd"),
    "vit": Preset(
        workload="vit",
        model=ViTConfig(image_size=32, patch_size=4, in_channels=3, num_classes=10, dim=256, depth=6, n_heads=8,
                        mlp_ratio=4, n_cls_tokens=16),
        batch_size=256, steps=5000,
        optimizer=OptimizerConfig("adamw", lr=3e-4, weight_decay=0.05),
        clip_grad_norm=1.0, warmup_steps=200, eval_examples=10000),
    "minigpt": Preset(
        workload="minigpt",
        model=GPTConfig(vocab_size=4096, block_size=128, n_layer=6, n_head=8, n_embd=256, dropout=0.1),
        batch_size=64, steps=5000,
        optimizer=OptimizerConfig("adamw", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1),
        clip_grad_norm=1.0, warmup_steps=100, tokenizer="bpe", tokenizer_vocab=4096, eval_examples=2048),
    "gpt2-small": Preset(
        workload="gpt2-small",
        model=GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
        batch_size=8, steps=2000,
        optimizer=OptimizerConfig("adamw", lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1),
        clip_grad_norm=1.0, warmup_steps=100, tokenizer="bpe", tokenizer_vocab=50257, eval_examples=256),
}

CPU_PRESETS = {
    "reverse": replace(
        PRESETS["reverse"], batch_size=32, steps=450, warmup_steps=10,
        note="CPU: the full reverse model and task, batch 32 and 450 steps (full: batch 64, 1000 steps)"),
    "vit": replace(
        PRESETS["vit"],
        model=replace(PRESETS["vit"].model, dim=128, depth=4, n_heads=4, n_cls_tokens=4),
        batch_size=32, steps=300, warmup_steps=20, eval_examples=1000,
        note="CPU: dim 128, depth 4, 4 heads, 4 class tokens, batch 32, 300 steps "
             "(full: dim 256, depth 6, 8 heads, 16 class tokens, batch 256, 5000 steps)"),
    "minigpt": replace(
        PRESETS["minigpt"],
        model=replace(PRESETS["minigpt"].model, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
        batch_size=16, steps=300, warmup_steps=20, eval_examples=160,
        note="CPU: seq 64, dim 128, 4 layers, 4 heads, batch 16, 300 steps, no dropout "
             "(full: seq 128, dim 256, 6 layers, 8 heads, batch 64, 5000 steps)"),
    "gpt2-small": replace(
        PRESETS["gpt2-small"],
        model=replace(PRESETS["gpt2-small"].model, vocab_size=4096, block_size=128, n_layer=4, n_head=4,
                      n_embd=256),
        batch_size=4, steps=100, warmup_steps=10, eval_examples=32, tokenizer_vocab=4096,
        note="CPU: vocab 4096 (the BPE tokenizer's), seq 128, dim 256, 4 layers, 4 heads, batch 4, 100 steps "
             "(full: vocab 50304, seq 1024, dim 768, 12 layers, 12 heads, batch 8, 2000 steps)"),
}

WORKLOADS = tuple(PRESETS)

"""Training and evaluation of the reference workloads: the main job of cutegrad.

`python -m cutegrad.train <workload>` and `cutegrad train <workload>` (the
console script, cutegrad/cli.py) run `train()`; `cutegrad eval <workload>
--checkpoint PATH` runs `evaluate_checkpoint()`.

A run:
1. picks the device (CUDA when `cutegrad.cuda.is_available()`, else CPU)
   and the preset (`models.PRESETS` on CUDA, `models.CPU_PRESETS` on the
   CPU, announced in one line), then applies the command-line overrides;
2. builds the data: the reversal task (reverse), the procedural images or
   CIFAR-10 (vit), a tokenized text corpus (minigpt, gpt2-small);
3. trains for `steps` steps with the preset's optimizer, gradient clipping
   and warmup + cosine schedule, with a progress bar showing loss and
   throughput;
4. evaluates: exact-sequence accuracy on held-out sequences (reverse), test
   accuracy (vit), validation loss (minigpt, gpt2-small);
5. writes into `--out`: `model.safetensors` (the state_dict, with the
   preset, model config and data description in the metadata so
   `evaluate_checkpoint` rebuilds the model and its eval data from the file
   alone), `metrics.json`, `loss.png` (with the `plot` extra; otherwise a text
   summary of the loss curve is printed), `train_state.safetensors` (what
   `--resume` continues from, train_state.py) and, for text workloads,
   `tokenizer.json`.

Evaluation is deterministic (fixed held-out examples, fixed validation
windows, no dropout), so re-evaluating a checkpoint on the same device and
dtype reproduces the metric written at the end of training.
"""
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import __version__, nn, ops, optim
from .autocast import is_autocast_enabled
from .autograd import no_grad
from .dtypes import bfloat16, float32
from .models import CPU_PRESETS, PRESETS, GPTConfig, OptimizerConfig, Preset, ViTConfig, build_model
from .random import manual_seed
from .train_state import (STATE_NAME, load_state, prepare_run_folder, random_state, restore_random_state,
                          save_state)

CHECKPOINT_NAME = "model.safetensors"
METRICS_NAME = "metrics.json"
PLOT_NAME = "loss.png"
TOKENIZER_NAME = "tokenizer.json"
# --dtype: fp32 trains in float32; bf16 keeps float32 master weights and runs the
# matmuls in bfloat16 under cutegrad.autocast, as PyTorch's mixed precision does
# (pure bf16 weights lose small AdamW updates to rounding).
PRECISIONS = ("fp32", "bf16")
PRECISION_ALIASES = {"float32": "fp32", "bfloat16": "bf16"}
# Held-out reversal sequences and validation windows come from this seed, never
# from --seed, so every run of a workload is scored on the same examples.
EVAL_SEED = 1234
REVERSE_EVAL_CHUNK = 250


_QUIET = False  # a data-parallel worker other than rank 0 prints nothing


def _say(message):
    if not _QUIET:
        print(message, file=sys.stderr, flush=True)


# --- device and preset ---------------------------------------------------------------
def cuda_available():
    try:
        from . import cuda
    except ImportError:
        return False
    return bool(cuda.is_available())


def pick_device(requested=None):
    """'cuda' when requested or available, else 'cpu'. An explicit 'cuda' without a GPU is an error."""
    if requested is None or requested == "auto":
        return "cuda" if cuda_available() else "cpu"
    if requested.startswith("cuda") and not cuda_available():
        raise RuntimeError(f"--device {requested}: no CUDA device is available (cutegrad.cuda.is_available() is False)")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise ValueError(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {requested!r}")
    return requested


def resolve_precision(dtype):
    """'fp32' or 'bf16' from --dtype (the long names float32/bfloat16 are accepted too)."""
    name = PRECISION_ALIASES.get(dtype, dtype)
    if name not in PRECISIONS:
        raise ValueError(f"--dtype must be one of {', '.join(PRECISIONS)} (or float32/bfloat16), got {dtype!r}")
    return name


def mixed_precision(device, precision):
    """The autocast region a forward pass runs in: bf16 autocast, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    from .autocast import autocast
    return autocast(device.split(":")[0], dtype=bfloat16)


def resolve_preset(workload, device, size=None, steps=None, batch_size=None, lr=None, tokenizer=None,
                   eval_examples=None):
    """The preset a run uses: full on CUDA, CPU-scaled on the CPU (or as `size` says), with overrides."""
    if workload not in PRESETS:
        raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(PRESETS)}")
    if size is None:
        size = "cpu" if device == "cpu" else "full"
    if size not in ("full", "cpu"):
        raise ValueError(f"--preset must be 'full' or 'cpu', got {size!r}")
    preset = (CPU_PRESETS if size == "cpu" else PRESETS)[workload]
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if lr is not None and not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    if eval_examples is not None and eval_examples < 1:
        raise ValueError(f"--eval-examples must be >= 1, got {eval_examples}")
    if tokenizer is not None:
        if preset.tokenizer is None:
            raise ValueError(f"--tokenizer applies to text workloads (minigpt, gpt2-small), not {workload}")
        if tokenizer not in ("bpe", "char"):
            raise ValueError(f"--tokenizer must be 'bpe' or 'char', got {tokenizer!r}")
    if steps is not None:
        preset = replace(preset, steps=steps, warmup_steps=min(preset.warmup_steps, steps))
    if lr is not None:
        preset = replace(preset, optimizer=replace(preset.optimizer, lr=lr))
    return preset.with_overrides(batch_size=batch_size, tokenizer=tokenizer, eval_examples=eval_examples)


# --- model, optimizer, schedule, loss ------------------------------------------------
def parameter_groups(model, weight_decay):
    """AdamW groups: weight decay on matrices and embeddings, none on biases, norm gains
    and whatever the model lists in `no_weight_decay()` (ViT's class tokens and positions)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and name not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, config: OptimizerConfig):
    if config.name == "sgd":
        return optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                         weight_decay=config.weight_decay)
    if config.name == "adamw":
        return optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
                           eps=config.eps)
    raise ValueError(f"unknown optimizer {config.name!r}; expected 'sgd' or 'adamw'")


def lr_factor(preset: Preset, t):
    """The learning-rate multiplier at step t (0-based) of the preset's schedule:
    "cosine": linear warmup, then cosine decay to min_lr_ratio;
    "wsd": linear warmup, flat, then cosine decay to min_lr_ratio over the last decay_fraction of the steps;
    "constant": linear warmup, then flat."""
    if t < preset.warmup_steps:
        return (t + 1) / preset.warmup_steps
    if preset.schedule == "constant":
        return 1.0
    if preset.schedule == "cosine":
        start = preset.warmup_steps
    else:
        start = max(preset.warmup_steps, preset.steps - int(round(preset.decay_fraction * preset.steps)))
    progress = min(1.0, max(0, t - start) / max(1, preset.steps - start))
    return preset.min_lr_ratio + (1 - preset.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, preset: Preset):
    if preset.schedule not in ("cosine", "wsd", "constant"):
        raise ValueError(f"unknown schedule {preset.schedule!r}; expected 'cosine', 'wsd' or 'constant'")
    if preset.schedule == "cosine":
        return optim.lr_scheduler.WarmupCosineLR(optimizer, preset.warmup_steps, preset.steps,
                                                 min_lr_ratio=preset.min_lr_ratio)
    return optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(preset, t))


def loss_fn(model, inputs, targets):
    """Mean cross-entropy; logits are scored in float32 whatever the model's dtype.

    Under autocast cross_entropy is a float32 op that reads 16-bit logits and
    accumulates in float32 itself, so the logits are not cast first (a cast
    would be a copy of the largest activation, and another in the backward)."""
    logits = model(inputs)
    if not is_autocast_enabled(logits.device.type):
        logits = logits.float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# --- workloads -----------------------------------------------------------------------
class ReverseWorkload:
    """Sequence reversal; eval: exact-sequence accuracy of teacher-forced argmax predictions.

    Teacher forcing scores exactly what greedy generation would: all
    predictions of a row are right given the true prefix iff greedy decoding
    reproduces the whole reversed sequence.
    """

    unit = "tokens"
    metric = "exact_sequence_accuracy"

    def __init__(self, preset, data=None):
        from .data import ReversalTask
        if data is not None:
            raise ValueError("--data does not apply to reverse: the reversal task generates its own sequences")
        cfg = preset.model
        self.task = ReversalTask(vocab_size=cfg.vocab_size, seq_len=cfg.block_size)
        self.preset = preset
        self.description = (f"reversal task: {self.task.length} symbols of {self.task.n_symbols}, "
                            f"seq {self.task.seq_len}")
        self.data_meta = {}

    def items_per_batch(self, batch_size):
        return batch_size * self.task.seq_len

    def train_batches(self, batch_size, seed):
        return self.task.batches(batch_size, "train", seed)

    def evaluate(self, model, device, dtype):
        from .data import exact_sequence_accuracy
        inputs, targets = self.task.sample(self.preset.eval_examples, "heldout", seed=EVAL_SEED)
        preds = []
        for i in range(0, len(inputs), REVERSE_EVAL_CHUNK):
            logits = model(ops.from_numpy(inputs[i:i + REVERSE_EVAL_CHUNK]).to(device))
            preds.append(ops.argmax(logits, -1).cpu().numpy())
        preds = np.concatenate(preds)
        supervised = targets != -100
        return {self.metric: exact_sequence_accuracy(preds, targets),
                "token_accuracy": float((preds == targets)[supervised].mean()),
                "heldout_sequences": int(len(inputs))}


class ImageWorkload:
    """vit: procedural 10-class images by default, CIFAR-10 with --data; eval: test accuracy."""

    unit = "images"
    metric = "test_accuracy"

    def __init__(self, preset, data=None):
        from .data import CIFAR10, SyntheticImages, find_cifar10
        self.preset = preset
        if data is None:
            self.train_set = SyntheticImages("train")
            self.test_set = SyntheticImages("test", size=preset.eval_examples)
            self.description = (f"procedural 32x32x3 10-class images ({len(self.train_set)} train, "
                                f"{len(self.test_set)} test)")
            self.data_meta = {"images": "synthetic"}
        else:
            found = find_cifar10(data)
            if found is None:
                raise FileNotFoundError(f"--data {data}: no CIFAR-10 archive or extracted folder found there "
                                        f"(expected cifar-10-python.tar.gz, cifar-10-batches-py, or the binary ones)")
            self.train_set = CIFAR10(data, "train")
            self.test_set = CIFAR10(data, "test")
            self.description = f"CIFAR-10 ({found[0]} format) from {found[1]}"
            self.data_meta = {"images": "cifar10", "data": str(Path(data).resolve())}

    def items_per_batch(self, batch_size):
        return batch_size

    def train_batches(self, batch_size, seed):
        from .data import DataLoader
        loader = DataLoader(self.train_set, batch_size, shuffle=True, drop_last=True, seed=seed)
        while True:
            for images, labels in loader:
                yield images.numpy(), labels.numpy()

    def evaluate(self, model, device, dtype):
        n = min(self.preset.eval_examples, len(self.test_set))
        correct = 0
        bs = self.preset.batch_size
        for i in range(0, n, bs):
            images, labels = self.test_set.get_batch(np.arange(i, min(i + bs, n)))
            logits = model(ops.from_numpy(images).to(device, dtype))
            correct += int((ops.argmax(logits, -1).cpu().numpy() == labels).sum())
        return {self.metric: correct / n, "test_images": n}


class TextWorkload:
    """minigpt and gpt2-small: next-token prediction on a corpus; eval: mean validation loss."""

    unit = "tokens"
    metric = "val_loss"

    def __init__(self, preset, data=None, tokenizer_file=None, corpus_meta=None):
        from .data import BPETokenizer, CharTokenizer, TextDataset, cache_dir, resolve_corpus, split_tokens
        self.preset = preset
        seq = preset.model.block_size
        if corpus_meta is not None:
            text = _reload_corpus(corpus_meta)
            name, source = corpus_meta["corpus"], corpus_meta["corpus_source"]
            self.corpus_description = f"corpus: {name} ({source})"
        else:
            corpus = resolve_corpus(data, log=lambda m: None)
            text, name, source = corpus.text, corpus.name, corpus.source
            if name == "tinyshakespeare" and not Path(source).is_file():
                source = str(cache_dir() / "tinyshakespeare.txt")  # downloaded: record where it was cached
            self.corpus_description = corpus.description
        if tokenizer_file is not None:
            cls = BPETokenizer if preset.tokenizer == "bpe" else CharTokenizer
            self.tokenizer = cls.load(tokenizer_file)
        elif preset.tokenizer == "bpe":
            self.tokenizer = BPETokenizer.train_cached(text, min(preset.tokenizer_vocab, preset.model.vocab_size))
        else:
            self.tokenizer = CharTokenizer.from_text(text)
        train_tokens, val_tokens = split_tokens(self.tokenizer.encode(text), 0.1)
        self.train_set = TextDataset(train_tokens, seq)
        self.val_set = TextDataset(val_tokens, seq)
        self.description = (f"{self.corpus_description}; {preset.tokenizer} tokenizer, vocab "
                            f"{self.tokenizer.vocab_size}; {len(train_tokens):,} train / {len(val_tokens):,} val tokens")
        self.data_meta = {"corpus": name, "corpus_source": source, "tokenizer": preset.tokenizer,
                          "corpus_sha256": _sha256(text)}

    def items_per_batch(self, batch_size):
        return batch_size * self.preset.model.block_size

    def train_batches(self, batch_size, seed):
        return self.train_set.random_batches(batch_size, seed)

    def eval_windows(self):
        """Fixed, evenly spaced validation windows (eval_examples of them)."""
        return np.linspace(0, len(self.val_set) - 1, self.preset.eval_examples).astype(np.int64)

    def evaluate(self, model, device, dtype):
        starts = self.eval_windows()
        bs = self.preset.batch_size
        total = 0.0
        for i in range(0, len(starts), bs):
            inputs, targets = self.val_set.get_batch(starts[i:i + bs])
            loss = loss_fn(model, ops.from_numpy(inputs).to(device), ops.from_numpy(targets).to(device))
            total += loss.item() * len(inputs)
        val_loss = total / len(starts)
        return {self.metric: val_loss, "val_perplexity": math.exp(min(val_loss, 700.0)),
                "val_windows": int(len(starts))}


def _sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _reload_corpus(meta):
    """The text a checkpoint was trained on, checked against the hash recorded at training time."""
    from .data import embedded_corpus
    if meta["corpus"] == "embedded":
        text = embedded_corpus()
    else:
        path = Path(meta["corpus_source"])
        if not path.is_file():
            raise FileNotFoundError(f"the corpus this checkpoint was trained on is gone: {path}")
        text = path.read_text(encoding="utf-8")
    if _sha256(text) != meta["corpus_sha256"]:
        raise ValueError(f"the corpus at {meta['corpus_source']} changed since training (sha256 differs); "
                         f"its validation split would not be the one the checkpoint was scored on")
    return text


WORKLOADS = {"reverse": ReverseWorkload, "vit": ImageWorkload, "minigpt": TextWorkload, "gpt2-small": TextWorkload}


def make_workload(preset, data=None):
    return WORKLOADS[preset.workload](preset, data)


def fit_vocab(preset, workload):
    """Text workloads: a char tokenizer (or a corpus too small for the BPE vocab) sets the model vocab
    when the preset's is too small; a larger preset vocab is kept (unused rows pad it, as GPT-2's 50304)."""
    if not isinstance(workload, TextWorkload):
        return preset
    n = workload.tokenizer.vocab_size
    if preset.tokenizer == "char" or n > preset.model.vocab_size:
        return replace(preset, model=replace(preset.model, vocab_size=n))
    return preset


# --- training ------------------------------------------------------------------------
def _batch_to(batch, device, dtype):
    inputs, targets = batch
    x = ops.from_numpy(np.ascontiguousarray(inputs))
    x = x.to(device, dtype) if x.is_floating_point() else x.to(device)
    return x, ops.from_numpy(np.ascontiguousarray(targets)).to(device)


class _LossLog:
    """Per-step losses kept as device tensors and read in blocks, so the host does not wait
    on the device every step."""

    def __init__(self):
        self.values = []
        self._pending = []

    def add(self, loss):
        self._pending.append(loss.detach())

    def flush(self):
        if self._pending:
            self.values.extend(float(v) for v in ops.stack(self._pending).float().cpu().numpy())
            self._pending = []
        return self.values[-1] if self.values else float("nan")


def _progress(total, desc, enabled):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def make_step(model, optimizer, clip_grad_norm, amp):
    """One training step as a function of the batch: zero the grads, forward under `amp`,
    backward, clip, update. It returns the detached loss and never reads a value on the
    host, so `cutegrad.graphs.graphed` can capture it whole."""

    def step(inputs, targets):
        optimizer.zero_grad(set_to_none=True)
        with amp:
            loss = loss_fn(model, inputs, targets)
        loss.backward()
        if clip_grad_norm is not None:
            # the fused optimizers apply the clipping coefficient as their gradient scale (no scaling pass)
            optimizer.clip_grad_norm_(clip_grad_norm)
        optimizer.step()
        return loss.detach()
    return step


def _device_lrs(optimizer, device):
    """Learning rates as one-element device tensors: a captured optimizer step reads them from
    device memory, so the scheduler's in-place updates between replays take effect."""
    for g in optimizer.param_groups:
        g["lr"] = ops.full((1,), float(g["lr"]), dtype=float32, device=device)


def train(workload, device=None, steps=None, batch_size=None, dtype=None, seed=None, data=None, out="runs/run",
          lr=None, preset=None, tokenizer=None, eval_examples=None, progress=True, log_every=10, graphs=False,
          overwrite=False, resume=False, save_every=1000):
    """Train one workload and write the checkpoint, metrics and plot into `out`; returns the metrics dict.

    graphs=True captures the whole step (forward, backward, clipping, optimizer, grad zeroing) once
    with `cutegrad.graphs.graphed` after one eager warm-up step, and replays it for every later batch.
    An `out` that already holds a run is refused unless overwrite=True replaces it or resume=True
    continues it from its train_state.safetensors (written every `save_every` steps and at the end);
    a resumed run keeps the saved configuration, and `steps` may extend it.
    """
    t_start = time.perf_counter()
    if save_every is not None and save_every < 1:
        raise ValueError(f"--save-every must be >= 1, got {save_every}")
    device = pick_device(device)
    dp = _data_parallel(device)
    device = dp.device if dp is not None else device
    writer = dp is None or dp.is_main  # data parallel: rank 0 alone writes into the run folder
    out = prepare_run_folder(out, overwrite, resume) if writer else Path(out)
    state = load_state(out) if resume else None
    if state is not None:
        saved = state["preset"]
        asked = {"--batch-size": (batch_size, saved["batch_size"]), "--lr": (lr, saved["optimizer"]["lr"]),
                 "--tokenizer": (tokenizer, saved["tokenizer"]), "--data": (data, state["data"]),
                 "--eval-examples": (eval_examples, saved["eval_examples"]), "--seed": (seed, state["seed"]),
                 "--dtype": (dtype and resolve_precision(dtype), state["dtype"]), "--preset": (preset, None)}
        changed = [flag for flag, (value, kept) in asked.items() if value is not None and value != kept]
        if changed:
            raise ValueError(f"--resume continues the saved configuration; {', '.join(changed)} cannot change it "
                             f"(only --steps, to train longer)")
        workload_saved = saved["workload"]
        if workload_saved != workload:
            raise ValueError(f"--resume: {out} holds a {workload_saved} run, not {workload}")
        dtype, seed, data = state["dtype"], state["seed"], state["data"]
    precision = resolve_precision(dtype or "fp32")
    seed = 0 if seed is None else seed
    if graphs and not device.startswith("cuda"):
        raise ValueError(f"--graphs captures CUDA graphs and needs a CUDA device, got --device {device}")
    if state is None:
        preset = resolve_preset(workload, device, preset, steps, batch_size, lr, tokenizer, eval_examples)
    else:
        preset = _preset_from(state["preset"])
        if steps is not None:
            if steps < state["step"]:
                raise ValueError(f"--steps {steps}: the run to resume has already trained {state['step']} steps")
            preset = replace(preset, steps=steps)
    if dp is not None:
        dp.start(preset.batch_size)
        progress = progress and dp.is_main
    if preset.note:
        _say(f"cutegrad train {workload}: scaled-down preset for {device} ({preset.note}); "
             f"--preset full runs the full-size configuration of docs/training.md")
    manual_seed(seed)
    work = make_workload(preset, data)
    preset = fit_vocab(preset, work)
    work.preset = preset
    if state is not None and work.data_meta != state["data_meta"]:
        raise ValueError(f"--resume: the training data differs from the data the run started with "
                         f"({work.data_meta} vs {state['data_meta']})")
    if isinstance(work, TextWorkload) and writer:
        work.tokenizer.save(out / TOKENIZER_NAME)
    _say(f"cutegrad train {workload}: {work.description}")
    model = build_model(preset.model).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    _say(f"cutegrad train {workload}: {n_params:,} parameters, batch {preset.batch_size}, {preset.steps} steps, "
         f"{preset.optimizer.name} lr {preset.optimizer.lr}, {device}, {precision}"
         f"{', whole step in a CUDA graph' if graphs else ''}")
    opt = build_optimizer(model, preset.optimizer)
    sched = build_scheduler(opt, preset)
    batches = work.train_batches(preset.batch_size, seed)
    items = work.items_per_batch(preset.batch_size)
    losses = _LossLog()
    first, trained_s = 1, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        losses.values = list(state["losses"])
        first, trained_s = state["step"] + 1, state["train_time_s"]
        for _ in range(state["step"]):  # the batches the run has seen, so the data order continues
            next(batches)
        restore_random_state(device, state["random"])
        _say(f"cutegrad train {workload}: resumed from {out / STATE_NAME} after step {state['step']}")
    if graphs:
        _device_lrs(opt, device)
    if dp is not None:
        _say(f"cutegrad train {workload}: {dp.describe(preset.batch_size)}")
    step_fn = make_step(dp.wrap(model) if dp is not None else model, opt, preset.clip_grad_norm,
                        mixed_precision(device, precision))

    def save_training_state(step):
        if not writer:
            return
        losses.flush()
        save_state(out, {"preset": preset.to_dict(), "dtype": precision, "seed": seed, "data": data,
                         "data_meta": work.data_meta, "step": step, "losses": losses.values,
                         "train_time_s": trained_s + time.perf_counter() - t_train, "random": random_state(device),
                         "model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()})

    bar = _progress(preset.steps, f"train {workload}", progress)
    if bar is not None:
        bar.update(first - 1)
    model.train()
    t_train = time.perf_counter()
    t_window, n_window, rate = t_train, 0, 0.0
    replay = None
    for step in range(first, preset.steps + 1):
        batch = next(batches)
        inputs, targets = _batch_to(dp.shard(batch) if dp is not None else batch, device, float32)
        if not graphs:
            loss = step_fn(inputs, targets)
        elif replay is None:
            from .graphs import graphed
            replay = graphed(step_fn, (inputs, targets), warmup=1)
            loss = replay.warmup_outputs
        else:
            # The static output is overwritten by the next replay: keep a copy.
            loss = replay(inputs, targets).clone()
        sched.step()
        losses.add(dp.average(loss) if dp is not None else loss)
        n_window += 1
        if step % log_every == 0 or step == preset.steps:
            last = losses.flush()
            if not math.isfinite(last):
                raise FloatingPointError(f"cutegrad train {workload}: loss became {last} at step {step}; "
                                         f"try a lower --lr")
            now = time.perf_counter()
            rate = n_window * items / max(now - t_window, 1e-9)
            t_window, n_window = now, 0
            if bar is not None:
                bar.set_postfix_str(f"loss {last:.4f}, {rate:,.0f} {work.unit}/s")
        if bar is not None:
            bar.update(1)
        if save_every and step % save_every == 0 and step < preset.steps:
            save_training_state(step)
    train_time = trained_s + time.perf_counter() - t_train
    save_training_state(preset.steps)
    if bar is not None:
        bar.close()
    if replay is not None:
        replay.reset()
    if dp is not None:
        dp.finish()
        if not dp.is_main:
            return None

    model.eval()
    with no_grad(), mixed_precision(device, precision):
        result = work.evaluate(model, device, float32)
    _say(f"cutegrad train {workload}: {work.metric} = {result[work.metric]:.4f}")

    meta = checkpoint_metadata(preset, work, precision, seed)
    from .io import save
    save(model.state_dict(), out / CHECKPOINT_NAME, metadata=meta)
    metrics = {
        "workload": workload,
        "device": device,
        "dtype": precision,
        "graphs": graphs,
        "seed": seed,
        "preset": preset.to_dict(),
        "data": work.description,
        "parameters": n_params,
        "steps": preset.steps,
        "loss": losses.values,
        "eval": {"metric": work.metric, "value": result[work.metric], **result},
        "throughput": {"unit": f"{work.unit}/s", "mean": preset.steps * items / max(train_time, 1e-9)},
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
        "checkpoint": CHECKPOINT_NAME,
        "cutegrad_version": __version__,
        **({"data_parallel": dp.metrics(preset.batch_size)} if dp is not None else {}),
    }
    _write_json(out / METRICS_NAME, metrics)
    plot_losses(losses.values, out / PLOT_NAME, f"{workload}: {work.metric} {result[work.metric]:.4f}")
    _say(f"cutegrad train {workload}: wrote {out / CHECKPOINT_NAME}, {out / METRICS_NAME} "
         f"({metrics['wall_time_s']:.1f} s wall)")
    return metrics


def _data_parallel(device):
    """The data-parallel plan of a worker of `cutegrad train --nproc-per-node N`, else None."""
    global _QUIET
    from .distributed.data_parallel import DataParallelRun
    dp = DataParallelRun.from_env(device)
    _QUIET = dp is not None and not dp.is_main
    return dp


def checkpoint_metadata(preset, work, dtype, seed):
    """str -> str metadata that lets `load_checkpoint` rebuild the model and its eval data."""
    return {
        "format": "cutegrad.train/1",
        "workload": preset.workload,
        "preset": json.dumps(preset.to_dict()),
        "model_kind": preset.model_kind,
        "model_config": json.dumps(preset.model.to_dict()),
        "data": json.dumps(work.data_meta),
        "dtype": dtype,
        "seed": str(seed),
    }


def _write_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def loss_summary(losses, parts=10):
    """The loss curve in one line: the mean loss of each tenth of the run, then first, last and best."""
    if not losses:
        return "no losses recorded"
    chunks = np.array_split(np.asarray(losses, dtype=np.float64), min(parts, len(losses)))
    best = int(np.argmin(losses))
    return (f"mean loss by tenth of the run: {' '.join(f'{c.mean():.4g}' for c in chunks)}; "
            f"first {losses[0]:.4g}, last {losses[-1]:.4g}, lowest {losses[best]:.4g} at step {best + 1}")


def plot_losses(losses, path, title):
    """Loss curve (raw and smoothed) as a PNG. Without matplotlib (the `plot` extra) it prints
    the curve's text summary instead."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say(f"cutegrad train: {loss_summary(losses)}")
        _say("cutegrad train: no loss plot: matplotlib is missing (pip install 'cutegrad[plot]')")
        return False
    steps = np.arange(1, len(losses) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.8, alpha=0.45, label="loss")
    if len(losses) >= 10:
        w = max(5, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.6, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- evaluation of a checkpoint --------------------------------------------------------
def _config_from(kind, d):
    if kind == "gpt":
        return GPTConfig(**d)
    if kind == "vit":
        return ViTConfig(**d)
    raise ValueError(f"unknown model kind {kind!r} in checkpoint metadata")


def _preset_from(d):
    d = dict(d)
    kind = d.pop("model_kind")
    d["model"] = _config_from(kind, d["model"])
    opt = dict(d["optimizer"])
    opt["betas"] = tuple(opt["betas"])
    d["optimizer"] = OptimizerConfig(**opt)
    return Preset(**d)


def load_checkpoint(path, device="cpu"):
    """(model, preset, metadata) from a checkpoint written by `train`."""
    from .io import load, load_metadata
    meta = load_metadata(path)
    if meta.get("format") != "cutegrad.train/1":
        raise ValueError(f"{path}: not a cutegrad training checkpoint (its metadata has no "
                         f"'format': 'cutegrad.train/1'); was it written by `cutegrad train`?")
    preset = _preset_from(json.loads(meta["preset"]))
    model = build_model(preset.model)
    model.load_state_dict(load(path))
    return model.to(device), preset, meta


def evaluate_checkpoint(checkpoint, workload=None, device=None):
    """Rebuild the model and eval data from a checkpoint (a model.safetensors, or the run folder
    holding one) and return the eval results dict."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: no such file: {path}")
    device = pick_device(device)
    model, preset, meta = load_checkpoint(path, device)
    if workload is not None and workload != preset.workload:
        raise ValueError(f"{path} is a {preset.workload} checkpoint, not {workload}")
    data_meta = json.loads(meta["data"])
    if preset.workload == "reverse":
        work = ReverseWorkload(preset)
    elif preset.workload == "vit":
        work = ImageWorkload(preset, data_meta.get("data"))
    else:
        tok = path.with_name(TOKENIZER_NAME)
        if not tok.is_file():
            raise FileNotFoundError(f"{tok}: the tokenizer written next to the checkpoint is missing")
        work = TextWorkload(preset, tokenizer_file=tok, corpus_meta=data_meta)
    model.eval()
    with no_grad(), mixed_precision(device, resolve_precision(meta["dtype"])):
        result = work.evaluate(model, device, float32)
    return {"workload": preset.workload, "metric": work.metric, "value": result[work.metric], **result}


if __name__ == "__main__":
    from .cli import main
    sys.exit(main(["train"] + sys.argv[1:]))

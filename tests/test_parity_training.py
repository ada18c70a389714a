"""20 training steps of each reference model, cutegrad vs PyTorch (CPU, float32).

For each workload the test builds the cutegrad model from the preset's
config *reduced in size* (fewer layers, smaller width, shorter sequences and
batches: the same architecture code, so CI stays fast), writes its initial
weights with `cutegrad.io.save`, loads them into the PyTorch
re-implementation of bench/torch_models.py with `safetensors.torch.load_file`,
and trains both for 20 steps on identical batches drawn from the workload's
real data pipeline, with the preset's optimizer, weight-decay groups,
gradient clipping and warmup + cosine schedule (dropout off). The losses must
agree within 1e-4 relative at every step.

The PyTorch side is written independently of cutegrad.models: ViT's patch
embedding is a strided Conv2d there (cutegrad flattens patches and uses a
Linear), and the schedule is a LambdaLR with the formula written out there.
`reduced` and `build_pair` are shared with tests/test_parity_gpu.py.
"""
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors.torch")

# bench/ is a package at the repository root, which a bare `pytest` does not put on sys.path.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import cutegrad  # noqa: E402
from bench.torch_models import from_cutegrad, torch_loss, torch_optimizer, torch_scheduler  # noqa: E402
from cutegrad import train as T  # noqa: E402
from cutegrad.data import CharTokenizer, ReversalTask, SyntheticImages, TextDataset, embedded_corpus  # noqa: E402
from cutegrad.models import PRESETS  # noqa: E402

STEPS = 20
RTOL = 1e-4


# --- the reduced workloads -----------------------------------------------------------------
def _text_batches(vocab_cap, seq, batch, seed):
    """Windows of the embedded corpus: characters (minigpt) or raw UTF-8 bytes (gpt2-small)."""
    text = embedded_corpus()
    if vocab_cap is None:
        tok = CharTokenizer.from_text(text)
        tokens, vocab = tok.encode(text), tok.vocab_size
    else:
        tokens, vocab = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64), vocab_cap
    return vocab, TextDataset(tokens, seq).random_batches(batch, seed)


def reduced(workload, steps=STEPS):
    """(preset with a small model and batch, numpy batches for `steps` steps)."""
    p = replace(PRESETS[workload], steps=steps, warmup_steps=5)
    if workload == "reverse":
        model = replace(p.model, block_size=32, n_embd=64, n_head=4, n_layer=2)
        task = ReversalTask(vocab_size=model.vocab_size, seq_len=model.block_size)
        return replace(p, model=model, batch_size=16), task.batches(16, "train", seed=3)
    if workload == "vit":
        model = replace(p.model, dim=64, depth=2, n_heads=4, n_cls_tokens=4)
        images = SyntheticImages("train", size=16 * steps, seed=3)

        def batches():
            for i in range(steps):
                yield images.get_batch(np.arange(16 * i, 16 * (i + 1)))
        return replace(p, model=model, batch_size=16), batches()
    if workload == "minigpt":
        vocab, batches = _text_batches(None, 32, 8, seed=3)
        model = replace(p.model, vocab_size=vocab, block_size=32, n_embd=64, n_head=4, n_layer=2, dropout=0.0)
        return replace(p, model=model, batch_size=8, tokenizer="char"), batches
    vocab, batches = _text_batches(256, 64, 4, seed=3)
    model = replace(p.model, vocab_size=vocab, block_size=64, n_embd=96, n_head=4, n_layer=3)
    return replace(p, model=model, batch_size=4), batches


def build_pair(preset, device="cpu"):
    """(cutegrad model, PyTorch twin with the same initial weights), both in training mode on `device`."""
    cutegrad.manual_seed(0)
    cg_model = T.build_model(preset.model)
    th_model = from_cutegrad(cg_model, preset.model, device)
    cg_model = cg_model.to(device)
    cg_model.train()
    th_model.train()
    return cg_model, th_model


@pytest.mark.parametrize("workload", ["reverse", "vit", "minigpt", "gpt2-small"])
def test_twenty_training_steps_match_pytorch(workload):
    torch.manual_seed(0)
    preset, batches = reduced(workload)
    cg_model, th_model = build_pair(preset)

    cg_opt = T.build_optimizer(cg_model, preset.optimizer)
    cg_sched = T.build_scheduler(cg_opt, preset)
    th_opt = torch_optimizer(th_model, preset)
    th_sched = torch_scheduler(th_opt, preset)

    cg_losses, th_losses = [], []
    for _ in range(STEPS):
        inputs, targets = next(batches)
        x, y = T._batch_to((inputs, targets), "cpu", cutegrad.float32)
        loss = T.loss_fn(cg_model, x, y)
        cg_opt.zero_grad()
        loss.backward()
        if preset.clip_grad_norm is not None:
            cutegrad.nn.utils.clip_grad_norm_(cg_model.parameters(), preset.clip_grad_norm)
        cg_opt.step()
        cg_sched.step()
        cg_losses.append(loss.item())

        th_loss = torch_loss(th_model, torch.from_numpy(np.ascontiguousarray(inputs)),
                             torch.from_numpy(np.ascontiguousarray(targets)))
        th_opt.zero_grad()
        th_loss.backward()
        if preset.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(th_model.parameters(), preset.clip_grad_norm)
        th_opt.step()
        th_sched.step()
        th_losses.append(th_loss.item())

    cg_losses, th_losses = np.array(cg_losses), np.array(th_losses)
    rel = np.abs(cg_losses - th_losses) / np.abs(th_losses)
    assert rel.max() <= RTOL, (
        f"{workload}: losses diverge from PyTorch's (worst step {rel.argmax()}: relative error {rel.max():.2e})\n"
        f"cutegrad: {cg_losses}\ntorch:    {th_losses}")
    # The 20 steps must have trained something, or agreement would prove little.
    assert cg_losses[-5:].mean() < cg_losses[:5].mean()

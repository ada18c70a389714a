"""PyTorch training scripts, written as PyTorch users write them, run unchanged
with `import torch` resolving to cutegrad (tests/torch_alias_harness.py), and
compared with the same text run by real torch on the CPU.

- NANOGPT: nanoGPT's train.py in small (its model.py structure, argparse
  config, its DDP block: `RANK` in the environment, `init_process_group`,
  `DDP(model, device_ids=[ddp_local_rank])`, `require_backward_grad_sync`,
  `raw_model = model.module`, `destroy_process_group`; seeds,
  `torch.backends.cuda.matmul.allow_tf32`/`cudnn.allow_tf32`, device and
  dtype selection with `torch.cuda.is_available()`/`is_bf16_supported()`,
  `torch.amp.autocast` context, `torch.cuda.amp.GradScaler(enabled=...)`,
  AdamW param groups with the `fused` probe, `torch.compile`, cosine LR
  written into param groups, gradient accumulation, `scaler.unscale_` +
  `clip_grad_norm_`, `@torch.no_grad()` evaluation, a nested checkpoint
  `torch.save({"model", "optimizer", "iter_num"})` and
  `torch.load(map_location=device, weights_only=True)` with nanoGPT's
  `_orig_mod.` stripping, a DataLoader with a SequentialSampler or a
  DistributedSampler, `pin_memory().to(device, non_blocking=True)` on CUDA).
  Both runs start from the same weights (the harness saves torch's initial
  state_dict in each library's format and passes `--init_from`); losses
  match torch's within float32 rounding. The DDP path runs for real:
  `cutegrad launch` with 2 CPU processes (`backend="gloo"`, cutegrad's "cpu") against 1 process
  at the same global batch.
- AMP_SCALER: `torch.set_float32_matmul_precision("high")`, bfloat16 autocast
  on the CPU (`torch.autocast` as a decorator and `torch.amp.autocast` as a
  context), `torch.amp.GradScaler("cpu")` with
  growth every 3 steps, an LR scheduler: losses within bfloat16 rounding,
  the scale sequence equal.
- DATA: the data side as trainers write it: `random_split` with a seeded
  `torch.Generator`, `DataLoader(sampler=RandomSampler(...), num_workers=2,
  persistent_workers=True, worker_init_fn, pin_memory=torch.cuda.is_available())`,
  `WeightedRandomSampler`, `BatchSampler`, `SubsetRandomSampler`,
  `torch.compile(mode="reduce-overhead")`, two ranks' `DistributedSampler`s
  with `set_epoch` (shards equal to torch's). Other random orders differ
  between the libraries by design, so this one checks what must agree: every
  epoch sees each training sample once, the sampler lengths and sets, and
  both runs learn.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import cutegrad
from torch_alias_harness import run_script

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _restore_matmul_switches():
    """The scripts set process-wide precision switches (tf32, matmul precision); later tests get the defaults."""
    saved = [(lib.get_float32_matmul_precision(), lib.backends.cudnn.allow_tf32) for lib in (cutegrad, torch)]
    yield
    for lib, (precision, cudnn_tf32) in zip((cutegrad, torch), saved):
        lib.set_float32_matmul_precision(precision)
        lib.backends.cudnn.allow_tf32 = cudnn_tf32

NANOGPT = r'''
import argparse
import inspect
import math
import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed import init_process_group, destroy_process_group
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

parser = argparse.ArgumentParser()
parser.add_argument("--out_dir", default="out")
parser.add_argument("--init_from", default="")
parser.add_argument("--max_iters", type=int, default=12)
parser.add_argument("--batch_size", type=int, default=4)
parser.add_argument("--block_size", type=int, default=16)
parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
parser.add_argument("--learning_rate", type=float, default=3e-3)
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
parser.add_argument("--backend", default="nccl")
args = parser.parse_args()
gradient_accumulation_steps = args.gradient_accumulation_steps

ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    init_process_group(backend=args.backend)
    ddp_rank = int(os.environ["RANK"])
    ddp_local_rank = int(os.environ["LOCAL_RANK"])
    ddp_world_size = int(os.environ["WORLD_SIZE"])
    device = f"cuda:{ddp_local_rank}" if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    master_process = ddp_rank == 0
    seed_offset = ddp_rank
    assert gradient_accumulation_steps % ddp_world_size == 0
    gradient_accumulation_steps //= ddp_world_size
else:
    master_process = True
    seed_offset = 0
    ddp_world_size = 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16")
device_type = "cuda" if "cuda" in device else "cpu"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
ctx = nullcontext() if device_type == "cpu" else torch.amp.autocast(device_type=device_type, dtype=ptdtype)
torch.manual_seed(1337 + seed_offset)
torch.cuda.manual_seed(1337 + seed_offset)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

text = "the quick brown fox jumps over the lazy dog. " * 40
chars = sorted(set(text))
stoi = {ch: i for i, ch in enumerate(chars)}
data = np.array([stoi[c] for c in text], dtype=np.int64)
n = int(0.9 * len(data))
train_data, val_data = data[:n], data[n:]


class CharWindows(Dataset):
    def __init__(self, tokens, block_size):
        self.tokens, self.block_size = tokens, block_size

    def __len__(self):
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, i):
        s = i * self.block_size
        chunk = torch.from_numpy(self.tokens[s:s + self.block_size + 1].copy())
        return chunk[:-1], chunk[1:]


class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias=True)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = LayerNorm(n_embd, bias=True)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer=2, n_head=2, n_embd=32):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)]),
            ln_f=LayerNorm(n_embd, bias=True),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        param_dict = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == "cuda"
        extra_args = dict(fused=True) if use_fused else dict()
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)


model = GPT(len(chars), args.block_size)
if args.init_from:
    checkpoint = torch.load(args.init_from, map_location=device, weights_only=True)
    state_dict = checkpoint["model"]
    unwanted_prefix = "_orig_mod."
    for k, v in list(state_dict.items()):
        if k.startswith(unwanted_prefix):
            state_dict[k[len(unwanted_prefix):]] = state_dict.pop(k)
    model.load_state_dict(state_dict)
model.to(device)
scaler = torch.cuda.amp.GradScaler(enabled=(dtype == "float16"))
optimizer = model.configure_optimizers(0.1, args.learning_rate, (0.9, 0.95), device_type)
if args.compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[ddp_local_rank])
raw_model = model.module if ddp else model

train_set = CharWindows(train_data, args.block_size)
train_sampler = DistributedSampler(train_set, shuffle=False) if ddp else SequentialSampler(train_set)
train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler, drop_last=True)
val_loader = DataLoader(CharWindows(val_data, args.block_size), batch_size=args.batch_size)


def batches():
    epoch = 0
    while True:
        if ddp:
            train_sampler.set_epoch(epoch)
        epoch += 1
        for x, y in train_loader:
            if device_type == "cuda":
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            else:
                x, y = x.to(device), y.to(device)
            yield x, y


@torch.no_grad()
def estimate_loss():
    model.eval()
    out = []
    for x, y in val_loader:
        with ctx:
            _, loss = model(x.to(device), y.to(device))
        out.append(loss.item())
    model.train()
    return sum(out) / len(out)


def get_lr(it, warmup_iters=3, lr_decay_iters=12, min_lr=3e-4):
    if it < warmup_iters:
        return args.learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (args.learning_rate - min_lr)


iter_num = 0
losses, val_losses = [], []
stream = batches()
X, Y = next(stream)
for iter_num in range(args.max_iters):
    lr = get_lr(iter_num)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    if iter_num % 6 == 0 and master_process:
        val_losses.append(estimate_loss())
    for micro_step in range(gradient_accumulation_steps):
        if ddp:
            model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)
        with ctx:
            logits, loss = model(X, Y)
            loss = loss / gradient_accumulation_steps
        X, Y = next(stream)
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item() * gradient_accumulation_steps)

if master_process:
    val_losses.append(estimate_loss())
    os.makedirs(args.out_dir, exist_ok=True)
    checkpoint = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": iter_num}
    torch.save(checkpoint, os.path.join(args.out_dir, "ckpt.pt"))
if ddp:
    destroy_process_group()
'''

AMP_SCALER = r'''
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
torch.set_float32_matmul_precision("high")
rng = np.random.default_rng(0)
x = torch.from_numpy(rng.standard_normal((96, 16)).astype(np.float32))
y = torch.from_numpy((rng.standard_normal((96, 16)) @ rng.standard_normal(16) > 0).astype(np.int64))
loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)

model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 2))
if len(sys.argv) > 1:
    model.load_state_dict(torch.load(sys.argv[1]))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=12)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)


@torch.autocast(device_type="cpu", dtype=torch.bfloat16)
def logits_of(inputs):
    return model(inputs)


losses, scales = [], []
for epoch in range(2):
    for inputs, targets in loader:
        optimizer.zero_grad()
        with torch.amp.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = logits_of(inputs)
        loss = F.cross_entropy(out.float(), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(loss.item())
        scales.append(scaler.get_scale())
state = scaler.state_dict()
'''

DATA = r'''
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import (BatchSampler, DataLoader, RandomSampler, SequentialSampler, SubsetRandomSampler,
                              TensorDataset, WeightedRandomSampler, random_split)
from torch.utils.data.distributed import DistributedSampler


def seed_worker(worker_id):
    worker_seed = torch.initial_seed() % 2 ** 32
    np.random.seed(worker_seed)


torch.manual_seed(0)
rng = np.random.default_rng(1)
features = torch.tensor(rng.standard_normal((120, 8)), dtype=torch.float32)
labels = (features[:, 0] + features[:, 1] > 0).long()
ids = torch.arange(120)
dataset = TensorDataset(features, labels, ids)
g = torch.Generator()
g.manual_seed(42)
train_set, val_set = random_split(dataset, [0.75, 0.25], generator=g)

train_loader = DataLoader(train_set, batch_size=10, sampler=RandomSampler(train_set, generator=g), num_workers=2,
                          persistent_workers=True, worker_init_fn=seed_worker,
                          pin_memory=torch.cuda.is_available())
class_counts = np.bincount(labels.numpy(), minlength=2)
weights = [1.0 / class_counts[int(labels[i])] for i in val_set.indices]
val_loader = DataLoader(val_set, batch_size=6, sampler=WeightedRandomSampler(weights, num_samples=30))
index_batches = list(BatchSampler(SequentialSampler(range(10)), batch_size=4, drop_last=False))
sampler_rank0 = DistributedSampler(train_set, num_replicas=2, rank=0, seed=0)
sampler_rank1 = DistributedSampler(train_set, num_replicas=2, rank=1, seed=0)
shard_loader = DataLoader(train_set, batch_size=15, sampler=sampler_rank0)
shards, shard_ids = [], []
for epoch in range(2):
    sampler_rank0.set_epoch(epoch)
    sampler_rank1.set_epoch(epoch)
    shards.append((list(sampler_rank0), list(sampler_rank1)))
    shard_ids.append([i for _, _, idb in shard_loader for i in idb.tolist()])
subset_order = list(SubsetRandomSampler([2, 4, 6, 8]))

model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
model = torch.compile(model, mode="reduce-overhead")
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

seen_per_epoch, losses = [], []
for epoch in range(4):
    seen = []
    for xb, yb, idb in train_loader:
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        seen.extend(idb.tolist())
    seen_per_epoch.append(seen)

model.eval()
correct = total = 0
with torch.no_grad():
    for xb, yb, _ in val_loader:
        correct += (model(xb).argmax(dim=1) == yb).sum().item()
        total += yb.numel()
accuracy = correct / total
lengths = (len(train_set), len(val_set), len(train_loader), len(val_loader))
'''


def shared_init(tmp_path, script, argv):
    """Run the torch script for 0 steps; its initial weights saved as nanoGPT checkpoints ({"model": state_dict})
    for torch (.pt) and cutegrad (safetensors), with a torch.compile'd model's "_orig_mod." keys (the script strips
    them, as nanoGPT does)."""
    ns = run_script(script, list(argv), "torch")
    sd = {k: v.detach().cpu() for k, v in ns["raw_model"].state_dict().items()}
    pt, st = tmp_path / "init.pt", tmp_path / "init.safetensors"
    torch.save({"model": sd}, pt)
    cutegrad.save({"model": {"_orig_mod." + k: cutegrad.tensor(v.numpy()) for k, v in sd.items()}}, st)
    return pt, st


def test_nanogpt_style_script_matches_torch(tmp_path):
    base = ["--out_dir", str(tmp_path / "out")]
    pt, st = shared_init(tmp_path, NANOGPT, base + ["--max_iters", "0"])
    ref = run_script(NANOGPT, base + ["--init_from", str(pt)], "torch")
    ours = run_script(NANOGPT, base + ["--init_from", str(st)], "cutegrad")
    assert ours["torch"] is cutegrad and ref["torch"] is torch  # each run had the library it claims
    assert isinstance(ours["optimizer"], cutegrad.optim.AdamW) and not ours["scaler"].is_enabled()
    assert len(ours["losses"]) == len(ref["losses"]) == 12 and len(ours["val_losses"]) == 3
    np.testing.assert_allclose(ours["losses"], ref["losses"], rtol=2e-4)
    np.testing.assert_allclose(ours["val_losses"], ref["val_losses"], rtol=2e-4)
    assert ours["losses"][-1] < ours["losses"][0] - 0.5  # it learned
    assert cutegrad.backends.cuda.matmul.allow_tf32 and cutegrad.backends.cudnn.allow_tf32
    # the script's own nested checkpoint round-trips in cutegrad's format
    saved = cutegrad.load(str(tmp_path / "out" / "ckpt.pt"), map_location="cpu", weights_only=True)
    assert set(saved) == {"model", "optimizer", "iter_num"} and saved["iter_num"] == 11
    assert set(saved["model"]) == set(ref["raw_model"].state_dict())
    ref_opt = ref["optimizer"].state_dict()
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(ref_opt["param_groups"][0]["lr"])
    assert len(saved["optimizer"]["state"]) == len(ref_opt["state"])
    assert ours["model"] is ours["model"]._orig_mod is ours["raw_model"]  # compile kept the module (and its keys)


_LAUNCHED = r'''
import json
import pathlib
import sys

sys.path.insert(0, sys.argv.pop(1))  # tests/, for the harness
from torch_alias_harness import run_script

script = pathlib.Path(sys.argv.pop(1)).read_text()
ns = run_script(script, sys.argv[1:], "cutegrad")
assert ns["ddp"] and ns["gradient_accumulation_steps"] == 1 and ns["model"].module is ns["raw_model"]
if ns["master_process"]:
    pathlib.Path(ns["args"].out_dir, "val_losses.json").write_text(json.dumps(ns["val_losses"]))
'''


def test_nanogpt_style_script_trains_data_parallel_with_two_processes(tmp_path):
    """nanoGPT's DDP path for real: `cutegrad launch` starts 2 CPU processes ("gloo": the "cpu" backend),
    each with half of the global batch (batch 4, gradient accumulation 2 -> 1 per rank, DistributedSampler
    shards); the weights after 12 steps and the validation losses equal a 1-process run's within float32
    rounding (the gradients of each step are summed in another order; Adam magnifies that in weights near
    zero, hence the atol)."""
    args = ["--max_iters", "12", "--backend", "gloo"]  # torch's CPU backend name; cutegrad's "cpu" backend
    pt, st = shared_init(tmp_path, NANOGPT, ["--out_dir", str(tmp_path / "init"), "--max_iters", "0"])
    single = run_script(NANOGPT, args + ["--out_dir", str(tmp_path / "one"), "--init_from", str(st)], "cutegrad")
    assert not single["ddp"]
    (tmp_path / "train.py").write_text(NANOGPT)
    (tmp_path / "launched.py").write_text(_LAUNCHED)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    run = subprocess.run([sys.executable, "-m", "cutegrad.cli", "launch", "--standalone", "--nproc-per-node", "2",
                          str(tmp_path / "launched.py"), str(pathlib.Path(__file__).parent), str(tmp_path / "train.py"),
                          *args, "--out_dir", str(tmp_path / "two"), "--init_from", str(st)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one = cutegrad.load(str(tmp_path / "one" / "ckpt.pt"))
    two = cutegrad.load(str(tmp_path / "two" / "ckpt.pt"))
    assert two["iter_num"] == one["iter_num"] == 11 and set(two["model"]) == set(one["model"])
    init = cutegrad.load(str(st))["model"]
    for k, v in one["model"].items():
        assert not np.allclose(v.numpy(), init["_orig_mod." + k].numpy())  # every tensor trained
        np.testing.assert_allclose(two["model"][k].numpy(), v.numpy(), rtol=1e-4, atol=1e-5, err_msg=k)
    val_two = json.loads((tmp_path / "two" / "val_losses.json").read_text())
    np.testing.assert_allclose(val_two, single["val_losses"], rtol=1e-5)
    assert single["val_losses"][-1] < single["val_losses"][0] - 0.5


def test_amp_and_grad_scaler_script_matches_torch(tmp_path):
    ns = run_script(AMP_SCALER, [], "torch")
    pt, st = tmp_path / "init.pt", tmp_path / "init.safetensors"
    sd = ns["model"].state_dict()
    torch.save({k: v for k, v in sd.items()}, pt)
    ref0 = run_script(AMP_SCALER, [str(pt)], "torch")
    cutegrad.save({k: cutegrad.tensor(v.detach().numpy()) for k, v in sd.items()}, st)
    ours = run_script(AMP_SCALER, [str(st)], "cutegrad")
    assert cutegrad.get_float32_matmul_precision() == "high" and cutegrad.backends.cuda.matmul.allow_tf32
    assert ours["scales"] == ref0["scales"] and ours["scales"][-1] > ours["scales"][0]
    assert ours["state"] == ref0["state"]
    # bfloat16 matmuls (and torch's CPU autocast keeping more ops in bf16) differ in the last bits
    np.testing.assert_allclose(ours["losses"], ref0["losses"], rtol=3e-2, atol=3e-3)


def test_data_pipeline_script_runs_like_torch():
    ref = run_script(DATA, [], "torch")
    ours = run_script(DATA, [], "cutegrad")
    for ns in (ref, ours):
        train_ids = sorted(int(i) for i in ns["train_set"].indices)
        assert len(ns["seen_per_epoch"]) == 4
        for seen in ns["seen_per_epoch"]:
            assert sorted(seen) == train_ids  # each training sample once per epoch
        assert ns["seen_per_epoch"][0] != ns["seen_per_epoch"][1]
        assert np.mean(ns["losses"][-9:]) < np.mean(ns["losses"][:9])
        assert ns["accuracy"] > 0.7
    assert ours["lengths"] == ref["lengths"] == (90, 30, 9, 5)
    assert ours["index_batches"] == ref["index_batches"]
    # DistributedSampler draws torch's permutation: the same shards for the same seed and epoch
    assert ours["shards"] == ref["shards"]
    for rank0, rank1 in ours["shards"]:
        assert len(rank0) == len(rank1) == 45 and not set(rank0) & set(rank1)
        assert sorted(rank0 + rank1) == list(range(90))
    assert ours["shards"][0] != ours["shards"][1]  # set_epoch reshuffles
    assert len(ours["shard_loader"]) == len(ref["shard_loader"]) == 3
    for ns in (ref, ours):  # the loader follows its sampler's epoch, yielding rank 0's samples
        assert ns["shard_ids"] == [[int(ns["train_set"].indices[i]) for i in rank0] for rank0, _ in ns["shards"]]
    assert sorted(ours["subset_order"]) == sorted(ref["subset_order"]) == [2, 4, 6, 8]
    assert not set(ours["train_set"].indices) & set(ours["val_set"].indices)
    ours["train_loader"]._pool.close()


@pytest.mark.gpu
@pytest.mark.skipif(not (cutegrad.cuda.is_available() and torch.cuda.is_available()),
                    reason="needs a CUDA GPU and driver (for both libraries)")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_nanogpt_style_script_on_gpu(tmp_path, dtype):
    """The same script on the GPU: autocast in dtype, the GradScaler live for float16, cutegrad.compile
    capturing and replaying the model; losses within half-precision rounding of torch's (eager) run."""
    base = ["--out_dir", str(tmp_path / "out"), "--dtype", dtype]
    pt, st = shared_init(tmp_path, NANOGPT, base + ["--max_iters", "0"])
    ref = run_script(NANOGPT, base + ["--init_from", str(pt)], "torch")
    ours = run_script(NANOGPT, base + ["--init_from", str(st)], "cutegrad")
    assert ours["scaler"].is_enabled() == (dtype == "float16") == ref["scaler"].is_enabled()
    entries = ours["model"].forward.entries.values()
    assert any(not isinstance(e, int) and e.bwd is not None for e in entries)  # it captured
    np.testing.assert_allclose(ours["losses"], ref["losses"], rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(ours["val_losses"], ref["val_losses"], rtol=2e-2, atol=2e-2)

"""minigpt trained by cutegrad and by PyTorch for the same steps: validation loss side by side.

    python -m bench.convergence [--steps N] [--dtype bf16|fp32] [--graphs] [--out DIR]

The cutegrad run is `cutegrad train minigpt` itself (cutegrad.train.train).
The PyTorch run rebuilds what that run starts from: the same preset, corpus
and BPE tokenizer, the same initial weights (the seed's cutegrad model,
written with cutegrad.io.save and read with safetensors.torch), the same
batches in the same order, the same optimizer groups and warmup + cosine
schedule, the same clipping, the same precision (bf16 autocast or fp32), and
it is scored on the same validation windows. Only the dropout masks differ
(each framework draws its own), so the two validation losses are two samples
of one training recipe, not one computation: the issue's criterion is that
they agree within 2%.

Writes bench/results/convergence-minigpt-<gpu>.json (bench/results_file.py's
schema; the row holds both validation losses and their relative difference)
with loss curves (every 50 steps) and wall times.
Needs tiny Shakespeare where cutegrad.data finds it ($CUTEGRAD_DATA).
"""
import argparse
import math
import os
import tempfile
import time

import numpy as np


def torch_run(preset, work, weights, dtype, seed):
    """Train the PyTorch twin holding `weights` on work's batches; (losses, val_loss, seconds)."""
    import torch

    from bench.torch_models import torch_loss, torch_optimizer, torch_scheduler, torch_twin

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    model = torch_twin(preset.model, weights, dev)
    opt = torch_optimizer(model, preset)
    sched = torch_scheduler(opt, preset)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def loss_of(x, y):
        with amp:
            return torch_loss(model, x, y)

    batches = work.train_batches(preset.batch_size, seed)
    losses = []
    model.train()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(preset.steps):
        x, y = (torch.from_numpy(np.ascontiguousarray(a)).to(dev) for a in next(batches))
        loss = loss_of(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), preset.clip_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.detach())
    losses = torch.stack(losses).float().cpu().tolist()
    seconds = time.perf_counter() - t0

    model.eval()
    starts = work.eval_windows()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(starts), preset.batch_size):
            x, y = work.val_set.get_batch(starts[i:i + preset.batch_size])
            loss = loss_of(torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev))
            total += loss.item() * len(x)
    return losses, total / len(starts), seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--graphs", action="store_true", help="the cutegrad run replays a captured step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)

    import torch

    import cutegrad
    from cutegrad import train as T
    from bench.results_file import gpu_result, write_result
    from bench.torch_models import cutegrad_weights

    torch.empty(1, device="cuda")  # PyTorch creates the primary context cutegrad shares
    with tempfile.TemporaryDirectory() as tmp:
        ours = T.train("minigpt", device="cuda", steps=args.steps, dtype=args.dtype, seed=args.seed,
                       out=os.path.join(tmp, "cutegrad"), progress=False, graphs=args.graphs)
        # What train() starts from, rebuilt in the same order (the seed feeds the data, then the init).
        preset = T.resolve_preset("minigpt", "cuda", None, args.steps)
        cutegrad.manual_seed(args.seed)
        work = T.make_workload(preset)
        preset = T.fit_vocab(preset, work)
        work.preset = preset
        weights = cutegrad_weights(T.build_model(preset.model), tmp)
        th_losses, th_val, th_seconds = torch_run(preset, work, weights, args.dtype, args.seed)

    cg_val = ours["eval"]["value"]
    rel = abs(cg_val - th_val) / th_val
    within = rel <= 0.02 and all(math.isfinite(v) for v in (cg_val, th_val))
    rows = [{"name": f"minigpt validation loss after {preset.steps} steps, {args.dtype}", "unit": "loss",
             "cutegrad": cg_val, "baseline": th_val, "baseline_name": "PyTorch twin, same weights and batches",
             "relative_difference": rel, "within_2_percent": within}]
    result = gpu_result("convergence", torch, rows, argv, workload="minigpt", data=ours["data"],
                        steps=preset.steps, dtype=args.dtype, cutegrad_graphs=args.graphs,
                        val_windows=preset.eval_examples,
                        train_seconds={"cutegrad": ours["train_time_s"], "torch": th_seconds},
                        loss_every_50_steps={"cutegrad": ours["loss"][::50], "torch": th_losses[::50]})
    write_result(result, args.out, "convergence-minigpt")
    print(f"minigpt {preset.steps} steps {args.dtype}: val loss cutegrad {cg_val:.4f}, torch {th_val:.4f} "
          f"(relative difference {rel:.2%})")


if __name__ == "__main__":
    main()

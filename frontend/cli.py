"""The `cutegrad` command line: `cutegrad train <workload>` and `cutegrad eval <workload>`.

    cutegrad train reverse --device cpu --out runs/r
    cutegrad eval reverse --checkpoint runs/r          # or runs/r/model.safetensors

See docs/training.md for the workloads, presets and output files.
"""
import argparse
import json
import sys

from . import __version__
from .models import WORKLOADS


def _parser():
    p = argparse.ArgumentParser(prog="cutegrad", description="cutegrad: train and evaluate the reference workloads")
    p.add_argument("--version", action="version", version=f"cutegrad {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a reference workload and write checkpoint, metrics and loss plot "
                                     "(the plot needs the `plot` extra; otherwise a text summary is printed)",
                       description="Train a reference workload. Picks CUDA when available, else the CPU with a "
                                   "scaled-down preset.")
    t.add_argument("workload", choices=WORKLOADS)
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    t.add_argument("--preset", choices=("full", "cpu"), default=None,
                   help="configuration size (default: full on CUDA, cpu on the CPU)")
    t.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    t.add_argument("--batch-size", type=int, default=None, help="batch size (default: the preset's)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    t.add_argument("--dtype", choices=("fp32", "bf16", "float32", "bfloat16"), default=None,
                   help="fp32 (default), or bf16: bfloat16 autocast with float32 master weights (float32/bfloat16 are "
                        "aliases); the loss is always computed in float32")
    t.add_argument("--graphs", action="store_true",
                   help="CUDA only: capture the whole training step in a CUDA graph after one eager warm-up "
                        "step and replay it for every later batch")
    t.add_argument("--seed", type=int, default=None, help="seed of initialisation and data order (default 0)")
    t.add_argument("--data", default=None,
                   help="minigpt/gpt2-small: a text file (default: tiny Shakespeare when found, else the embedded "
                        "corpus); vit: a CIFAR-10 folder or archive (default: procedural images)")
    t.add_argument("--tokenizer", choices=("bpe", "char"), default=None,
                   help="minigpt/gpt2-small: byte-level BPE (default) or characters")
    t.add_argument("--eval-examples", type=int, default=None,
                   help="held-out sequences (reverse), test images (vit) or validation windows (text) to score")
    t.add_argument("--out", default=None, help="run folder (default: runs/<workload>); an existing run there is "
                                                 "refused unless --overwrite or --resume is given")
    t.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its train_state.safetensors (with the saved "
                        "configuration; --steps may extend it)")
    t.add_argument("--save-every", type=int, default=1000,
                   help="write train_state.safetensors every N steps (and always at the end)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--nproc-per-node", type=int, default=1,
                   help="data-parallel processes on this node (one per GPU); the batch size is the global batch")

    _add_launch(sub)

    e = sub.add_parser("eval", help="reload a checkpoint written by `cutegrad train` and compute its eval metric")
    e.add_argument("workload", choices=WORKLOADS)
    e.add_argument("--checkpoint", default=None,
                   help="a run folder of cutegrad train, or its model.safetensors (default: runs/<workload>)")
    e.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    return p


def _add_launch(sub):
    from .distributed.launch import add_arguments
    add_arguments(sub.add_parser("launch", help="start one process per GPU running a script (torchrun's flags)",
                                 description="Start --nproc-per-node worker processes running a script or module, "
                                             "with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set."))


def _launched(args, argv):
    """`cutegrad launch ...`, or `cutegrad train ... --nproc-per-node N` re-run under the launcher; None otherwise."""
    from .distributed import launch
    if args.command == "launch":
        return launch.run(args)
    if args.command == "train" and args.nproc_per_node > 1:
        return launch.relaunch_train(argv, args.nproc_per_node)
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    code = _launched(args, argv)
    if code is not None:
        return code
    from . import train as training
    try:
        if args.command == "train":
            metrics = training.train(
                args.workload, device=args.device, steps=args.steps, batch_size=args.batch_size, dtype=args.dtype,
                seed=args.seed, data=args.data, out=args.out or f"runs/{args.workload}", lr=args.lr,
                preset=args.preset, tokenizer=args.tokenizer, eval_examples=args.eval_examples,
                progress=not args.no_progress, graphs=args.graphs, overwrite=args.overwrite, resume=args.resume,
                save_every=args.save_every)
            if metrics is None:  # a data-parallel worker other than rank 0
                return 0
            ev = metrics["eval"]
            print(f"{args.workload}: {ev['metric']} {ev['value']:.4f} after {metrics['steps']} steps "
                  f"({metrics['wall_time_s']:.1f} s on {metrics['device']})")
        else:
            result = training.evaluate_checkpoint(args.checkpoint or f"runs/{args.workload}", args.workload,
                                                  args.device)
            print(json.dumps(result))
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"cutegrad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

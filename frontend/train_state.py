"""The run folder of `cutegrad train`: what it holds, the checks made before a run
writes into it, and the training state that `--resume` continues from.

A run folder holds `model.safetensors` (the model and what `cutegrad eval` needs
to rebuild it), `metrics.json`, `loss.png`, `tokenizer.json` for text workloads,
and `train_state.safetensors`: model, optimizer and schedule state, the step, the
random generators and the losses so far, written every `--save-every` steps and
at the end.  Everything is checked before any work starts, so a bad `--out` costs
nothing and never leaves half a run behind.
"""
import os
from pathlib import Path

STATE_NAME = "train_state.safetensors"
STATE_FORMAT = "cutegrad.train-state/1"
# What `--overwrite` removes: the files a run writes, never anything else in the folder.
RUN_FILES = ("model.safetensors", "metrics.json", "loss.png", "tokenizer.json", STATE_NAME)


def prepare_run_folder(out, overwrite=False, resume=False):
    """Check `out` for a new run (or a resumed one) and create it; raises ValueError saying
    what is wrong: an existing file, a parent that is a file, or an earlier run that would
    be overwritten silently."""
    out = Path(out)
    if overwrite and resume:
        raise ValueError("--overwrite and --resume contradict each other: choose one")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is an existing file, not a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} is a file, so no folder can be made under it")
            break
    held = [name for name in RUN_FILES if (out / name).exists()]
    if resume:
        if not (out / STATE_NAME).is_file():
            raise ValueError(f"--resume: {out} holds no {STATE_NAME} to continue from")
    elif held and not overwrite:
        raise ValueError(f"--out {out} already holds a run ({', '.join(held)}): pass --overwrite to replace it "
                         f"or --resume to continue it")
    elif overwrite:
        for name in held:
            (out / name).unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the folder ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: the folder is not writable")
    return out


def save_state(out, state):
    """Write the training state (a nested dict of tensors and plain values) atomically."""
    from .io import save
    save({"format": STATE_FORMAT, **state}, Path(out) / STATE_NAME)


def load_state(out):
    """The training state written by `save_state`, checked to be one."""
    from .io import load
    path = Path(out) / STATE_NAME
    state = load(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"--resume: {path} is not a cutegrad training state (format {STATE_FORMAT!r} expected)")
    return state


def random_state(device):
    """The generators a step draws from (CPU, and the device's Philox counter on CUDA)."""
    from .random import cpu_generator
    state = {"cpu": cpu_generator().get_state()}
    if device.startswith("cuda"):
        from .graphs.rng import default_generator
        seed, offset = default_generator(device).get_state()
        state["cuda"] = [seed, offset]
    return state


def restore_random_state(device, state):
    from .random import cpu_generator
    cpu_generator().set_state(state["cpu"])
    if device.startswith("cuda") and "cuda" in state:
        from .graphs.rng import default_generator
        seed, offset = state["cuda"]
        default_generator(device).set_state((int(seed), int(offset)))

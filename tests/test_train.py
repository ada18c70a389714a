"""cutegrad train / eval: presets, schedules, optimizer groups, and short end-to-end runs of every workload."""
import importlib.util
import json
import math

import numpy as np
import pytest

import cutegrad
from cutegrad import train as T
from cutegrad.cli import main
from cutegrad.io import load, load_metadata
from cutegrad.models import CPU_PRESETS, PRESETS, build

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """No downloads, and tokenizers trained into a private cache."""
    monkeypatch.setenv("CUTEGRAD_OFFLINE", "1")
    monkeypatch.setenv("CUTEGRAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CUTEGRAD_DATA", raising=False)
    monkeypatch.chdir(tmp_path)


def test_cpu_device_gets_the_cpu_preset_and_overrides_apply():
    assert T.resolve_preset("vit", "cpu") == CPU_PRESETS["vit"]
    assert T.resolve_preset("vit", "cuda") == PRESETS["vit"]
    assert T.resolve_preset("vit", "cpu", size="full") == PRESETS["vit"]
    p = T.resolve_preset("minigpt", "cpu", steps=7, batch_size=3, lr=0.5, tokenizer="char")
    assert (p.steps, p.batch_size, p.optimizer.lr, p.tokenizer) == (7, 3, 0.5, "char")
    assert p.warmup_steps == 7  # warmup never longer than the run
    assert p.optimizer.betas == PRESETS["minigpt"].optimizer.betas


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "--steps"), (dict(batch_size=0), "--batch-size"), (dict(lr=-1.0), "--lr"),
    (dict(tokenizer="char"), "text workloads"), (dict(size="huge"), "--preset"), (dict(eval_examples=0), "--eval"),
])
def test_bad_overrides_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        T.resolve_preset("reverse", "cpu", **kwargs)


def test_unknown_workload_and_device_are_named():
    with pytest.raises(ValueError, match="unknown workload"):
        T.resolve_preset("bert", "cpu")
    with pytest.raises(ValueError, match="--device"):
        T.pick_device("tpu")
    assert T.pick_device("cpu") == "cpu"


@pytest.mark.skipif(T.cuda_available(), reason="checks the error raised when no GPU is present")
def test_explicit_cuda_without_a_gpu_is_an_error():
    assert T.pick_device(None) == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        T.pick_device("cuda")


def test_weight_decay_skips_biases_norms_and_vit_tokens():
    gpt = build("reverse")
    decay, rest = T.parameter_groups(gpt, 0.1)
    names = {id(p): n for n, p in gpt.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "tok_emb.weight" in decayed and "blocks.0.attn.qkv.weight" in decayed
    assert not any(n.endswith(".bias") or ".norm" in n or n.startswith("norm.") for n in decayed)
    assert len(decay["params"]) + len(rest["params"]) == len(list(gpt.parameters()))
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.1, 0.0)
    vit = build("vit", cpu=True)
    names = {id(p): n for n, p in vit.named_parameters()}
    decay, _ = T.parameter_groups(vit, 0.05)
    decayed = {names[id(p)] for p in decay["params"]}
    assert "cls_tokens" not in decayed and "pos_emb" not in decayed and "patch_embed.proj.weight" in decayed


def _lrs(preset):
    model = build("reverse", n_layer=1)
    opt = T.build_optimizer(model, preset.optimizer)
    sched = T.build_scheduler(opt, preset)
    out = []
    for _ in range(preset.steps):
        out.append(opt.param_groups[0]["lr"])
        sched.step()
    return np.array(out)


def test_schedules():
    base = PRESETS["reverse"].with_overrides(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lr = base.optimizer.lr
    for kind in ("cosine", "wsd", "constant"):
        lrs = _lrs(base.with_overrides(schedule=kind))
        np.testing.assert_allclose(lrs[:10], lr * np.arange(1, 11) / 10)  # linear warmup
        assert np.all(np.diff(lrs[10:]) <= 1e-12)  # never rises after warmup
    cos = _lrs(base.with_overrides(schedule="cosine"))
    assert cos[55] == pytest.approx(lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))))
    wsd = _lrs(base.with_overrides(schedule="wsd", decay_fraction=0.25))
    np.testing.assert_allclose(wsd[10:76], lr)  # stable until the last quarter
    assert wsd[-1] == pytest.approx(lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 24 / 25))))
    np.testing.assert_allclose(_lrs(base.with_overrides(schedule="constant"))[10:], lr)
    with pytest.raises(ValueError, match="unknown schedule"):
        _lrs(base.with_overrides(schedule="step"))


def _run(tmp_path, workload, *extra):
    out = tmp_path / workload
    rc = main(["train", workload, "--device", "cpu", "--steps", "3", "--batch-size", "2", "--out", str(out),
               "--eval-examples", "24", "--no-progress", *extra])
    assert rc == 0
    return out, json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("workload, extra, metric", [
    ("reverse", (), "exact_sequence_accuracy"),
    ("vit", (), "test_accuracy"),
    ("minigpt", (), "val_loss"),
    ("gpt2-small", ("--tokenizer", "char"), "val_loss"),
])
def test_short_run_writes_outputs_and_the_checkpoint_reproduces_the_metric(tmp_path, capsys, workload, extra,
                                                                             metric):
    out, metrics = _run(tmp_path, workload, *extra)
    assert metrics["workload"] == workload and metrics["device"] == "cpu" and metrics["steps"] == 3
    assert len(metrics["loss"]) == 3 and all(math.isfinite(v) and v > 0 for v in metrics["loss"])
    assert metrics["eval"]["metric"] == metric
    assert metrics["preset"]["batch_size"] == 2 and metrics["preset"]["note"].startswith("CPU:")
    assert metrics["preset"]["eval_examples"] == 24
    assert metrics["wall_time_s"] >= metrics["train_time_s"] > 0
    assert metrics["throughput"]["unit"] in ("tokens/s", "images/s") and metrics["throughput"]["mean"] > 0
    assert (out / "loss.png").is_file() == HAS_MATPLOTLIB
    err = capsys.readouterr().err
    assert "scaled-down preset for cpu" in err
    meta = load_metadata(out / "model.safetensors")
    assert meta["workload"] == workload and json.loads(meta["preset"])["steps"] == 3
    assert set(load(out / "model.safetensors")) >= {"pos_emb.weight" if workload != "vit" else "pos_emb"}

    capsys.readouterr()
    assert main(["eval", workload, "--checkpoint", str(out / "model.safetensors"), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == metric
    assert result["value"] == metrics["eval"]["value"]  # bit-for-bit: same weights, same eval data


def test_training_is_seeded(tmp_path):
    _, a = _run(tmp_path / "a", "reverse", "--seed", "5")
    _, b = _run(tmp_path / "b", "reverse", "--seed", "5")
    _, c = _run(tmp_path / "c", "reverse", "--seed", "6")
    assert a["loss"] == b["loss"] and a["loss"] != c["loss"]


def test_text_data_flag_trains_on_that_file(tmp_path, capsys):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out, metrics = _run(tmp_path, "minigpt", "--data", str(corpus), "--tokenizer", "char")
    assert str(corpus) in metrics["data"]
    assert metrics["preset"]["model"]["vocab_size"] == len(set(corpus.read_text()))
    capsys.readouterr()
    assert main(["eval", "minigpt", "--checkpoint", str(out / "model.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["value"] == metrics["eval"]["value"]
    corpus.write_text("a different text " * 200)
    assert main(["eval", "minigpt", "--checkpoint", str(out / "model.safetensors")]) == 2
    assert "changed since training" in capsys.readouterr().err


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "minigpt", "--device", "cpu", "--data", str(tmp_path / "missing.txt"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["train", "reverse", "--device", "cpu", "--data", "x.txt", "--out", str(tmp_path / "o")]) == 2
    assert "does not apply to reverse" in capsys.readouterr().err
    assert main(["eval", "reverse", "--checkpoint", str(tmp_path / "nothing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    out, _ = _run(tmp_path, "reverse")
    assert main(["eval", "vit", "--checkpoint", str(out / "model.safetensors")]) == 2
    assert "is a reverse checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "resnet"])


def test_eval_rejects_a_file_not_written_by_train(tmp_path, capsys):
    cutegrad.io.save({"w": cutegrad.zeros(2)}, tmp_path / "other.safetensors")
    assert main(["eval", "reverse", "--checkpoint", str(tmp_path / "other.safetensors")]) == 2
    assert "not a cutegrad training checkpoint" in capsys.readouterr().err


def test_graphs_need_cuda_and_dtype_is_checked(tmp_path, capsys):
    assert main(["train", "reverse", "--device", "cpu", "--graphs", "--out", str(tmp_path / "g")]) == 2
    assert "--graphs captures CUDA graphs and needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--dtype must be one of fp32, bf16"):
        T.train("reverse", device="cpu", dtype="float16", out=tmp_path / "d")
    with pytest.raises(SystemExit):
        main(["train", "reverse", "--dtype", "fp16"])

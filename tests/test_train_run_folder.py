"""cutegrad train's run folder: --out checks, --overwrite, --resume, eval by folder, --version, and the
text summary of the loss curve."""
import builtins
import json

import pytest

import cutegrad
from cutegrad import train as T
from cutegrad.cli import main


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUTEGRAD_OFFLINE", "1")
    monkeypatch.setenv("CUTEGRAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def _train(out, *extra, steps="3"):
    return main(["train", "reverse", "--device", "cpu", "--steps", steps, "--batch-size", "4", "--out", str(out),
                 "--eval-examples", "16", "--no-progress", *extra])


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_out_that_is_a_file_or_under_a_file_is_one_clear_line(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert _train(f) == 2
    assert "is an existing file, not a folder" in _one_line_error(capsys)
    assert _train(f / "run") == 2
    assert "is a file, so no folder can be made under it" in _one_line_error(capsys)
    assert f.read_text() == "x"


def test_an_existing_run_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    first = json.loads((out / "metrics.json").read_text())
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert _train(out, "--seed", "3") == 2
    assert "already holds a run" in _one_line_error(capsys)
    assert json.loads((out / "metrics.json").read_text()) == first
    assert _train(out, "--seed", "3", "--overwrite") == 0
    assert json.loads((out / "metrics.json").read_text())["seed"] == 3
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only what a run writes
    assert _train(out, "--overwrite", "--resume") == 2
    assert "contradict" in _one_line_error(capsys)


def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(tmp_path, capsys, monkeypatch):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _train(whole, steps="6") == 0

    make_step = T.make_step

    def interrupted_after_4_steps(*args):
        step, calls = make_step(*args), []

        def run(*batch):
            calls.append(1)
            if len(calls) > 4:
                raise KeyboardInterrupt
            return step(*batch)
        return run

    monkeypatch.setattr(T, "make_step", interrupted_after_4_steps)
    with pytest.raises(KeyboardInterrupt):
        _train(part, "--save-every", "3", steps="6")
    monkeypatch.setattr(T, "make_step", make_step)
    assert not (part / "metrics.json").exists()
    assert _train(part, "--resume", steps="6") == 0  # continues from the state saved after step 3
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((part / "metrics.json").read_text())
    assert len(b["loss"]) == 6
    assert a["loss"] == b["loss"]  # same data order, optimizer and schedule state: bit-for-bit on the CPU
    assert a["eval"]["value"] == b["eval"]["value"]
    assert _train(part, "--resume", steps="8") == 0  # --steps trains a finished run longer
    assert len(json.loads((part / "metrics.json").read_text())["loss"]) == 8
    capsys.readouterr()
    assert _train(part, "--resume", "--batch-size", "8", steps="9") == 2
    assert "cannot change it" in _one_line_error(capsys)
    assert _train(tmp_path / "fresh", "--resume") == 2
    assert "holds no train_state.safetensors" in _one_line_error(capsys)


def test_save_every_writes_a_state_mid_run(tmp_path):
    out = tmp_path / "run"
    T.train("reverse", device="cpu", steps=4, batch_size=4, eval_examples=8, out=out, progress=False, save_every=2)
    from cutegrad.train_state import load_state
    state = load_state(out)
    assert state["step"] == 4 and len(state["losses"]) == 4
    with pytest.raises(ValueError, match="--save-every must be >= 1"):
        T.train("reverse", device="cpu", out=tmp_path / "x", save_every=0)


def test_eval_takes_the_run_folder_and_defaults_to_the_workload_run(tmp_path, capsys):
    assert main(["train", "reverse", "--device", "cpu", "--steps", "2", "--batch-size", "4",
                 "--eval-examples", "16", "--no-progress"]) == 0  # default --out runs/reverse
    written = json.loads((tmp_path / "runs" / "reverse" / "metrics.json").read_text())["eval"]["value"]
    capsys.readouterr()
    assert main(["eval", "reverse", "--checkpoint", "runs/reverse", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["value"] == written
    assert main(["eval", "reverse", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["value"] == written


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"cutegrad {cutegrad.__version__}"


def test_without_matplotlib_the_loss_curve_is_summarised_in_text(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert _train(tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert "mean loss by tenth of the run:" in err and "cutegrad[plot]" in err
    assert not (tmp_path / "run" / "loss.png").exists()


def test_loss_summary_names_the_curve():
    s = T.loss_summary([4.0, 3.0, 2.0, 1.0, 1.5])
    assert s.startswith("mean loss by tenth of the run: 4 3 2 1 1.5;")
    assert "first 4, last 1.5, lowest 1 at step 4" in s
    assert T.loss_summary([]) == "no losses recorded"

"""Text windows, the train/val split by position, prepare_text, and corpus resolution."""

from pathlib import Path

import numpy as np
import pytest

from cutegrad.data import DataLoader, TextDataset, collate_numpy, embedded_corpus, prepare_text, resolve_corpus, split_tokens
from cutegrad.data import corpus as corpus_mod

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def test_split_by_position():
    t = np.arange(100)
    train, val = split_tokens(t, 0.1)
    np.testing.assert_array_equal(train, np.arange(90))
    np.testing.assert_array_equal(val, np.arange(90, 100))
    train, val = split_tokens(t, 0.0)
    assert len(train) == 100 and len(val) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_tokens(t, 1.0)


def test_windows_are_shifted_by_one():
    tokens = np.arange(20, dtype=np.int32) * 3
    ds = TextDataset(tokens, seq_len=5)
    assert len(ds) == 15
    x, y = ds[4]
    np.testing.assert_array_equal(x, tokens[4:9])
    np.testing.assert_array_equal(y, tokens[5:10])
    x, y = ds[-1]
    np.testing.assert_array_equal(y, tokens[15:20])
    bx, by = ds.get_batch(np.array([0, 14, 7]))
    for row, i in enumerate([0, 14, 7]):
        np.testing.assert_array_equal(bx[row], ds[i][0])
        np.testing.assert_array_equal(by[row], ds[i][1])
    assert bx.dtype == np.int64
    with pytest.raises(IndexError, match="out of range"):
        ds[15]


def test_every_window_visited_once_per_epoch():
    tokens = np.arange(50)
    ds = TextDataset(tokens, seq_len=4)
    starts = np.concatenate([x[:, 0] for x, _ in DataLoader(ds, batch_size=8, shuffle=True, seed=0, collate_fn=collate_numpy)])
    np.testing.assert_array_equal(np.sort(starts), np.arange(46))


def test_random_batches_seeded_and_in_range():
    tokens = np.random.default_rng(0).integers(0, 50, size=1000)
    ds = TextDataset(tokens, seq_len=16)
    a, b = ds.random_batches(8, seed=1), ds.random_batches(8, seed=1)
    for _ in range(5):
        (xa, ya), (xb, yb) = next(a), next(b)
        np.testing.assert_array_equal(xa, xb)
        assert xa.shape == ya.shape == (8, 16)
        np.testing.assert_array_equal(xa[:, 1:], ya[:, :-1])
        for row in range(8):
            # Each row is a contiguous slice of the stream.
            starts = np.flatnonzero(tokens[: len(tokens) - 16] == xa[row, 0])
            assert any(np.array_equal(tokens[s : s + 17], np.append(xa[row], ya[row, -1])) for s in starts)


def test_text_dataset_errors():
    with pytest.raises(ValueError, match="too few"):
        TextDataset(np.arange(5), seq_len=5)
    with pytest.raises(TypeError, match="integers"):
        TextDataset(np.zeros(10), seq_len=2)
    with pytest.raises(ValueError, match="one-dimensional"):
        TextDataset(np.zeros((4, 4), dtype=np.int64), seq_len=2)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_prepare_text(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("CUTEGRAD_CACHE", str(tmp_path))
    text = embedded_corpus()[:40_000]
    data = prepare_text(text, tokenizer=kind, vocab_size=512, seq_len=32, val_fraction=0.1)
    all_ids = data.tokenizer.encode(text)
    assert len(data.train.tokens) + len(data.val.tokens) == len(all_ids)
    np.testing.assert_array_equal(np.concatenate([data.train.tokens, data.val.tokens]), all_ids)
    assert data.vocab_size == data.tokenizer.vocab_size
    if kind == "char":
        # Char ids split anywhere; BPE ids may split a multi-byte character at the cut.
        assert data.tokenizer.decode(data.train.tokens) + data.tokenizer.decode(data.val.tokens) == text
    assert data.tokenizer.decode(all_ids) == text
    if kind == "bpe":
        assert data.vocab_size == 512
        assert len(list((tmp_path / "bpe").glob("*.json"))) == 1
    with pytest.raises(ValueError, match="'bpe' or 'char'"):
        prepare_text(text, tokenizer="word")


# -- corpus resolution ----------------------------------------------------------------------------


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $CUTEGRAD_DATA, an empty cache, and a working directory with no data/ folders."""
    monkeypatch.delenv("CUTEGRAD_DATA", raising=False)
    monkeypatch.delenv("CUTEGRAD_OFFLINE", raising=False)
    monkeypatch.setenv("CUTEGRAD_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    return tmp_path


def test_explicit_path_wins(isolated):
    p = isolated / "mine.txt"
    p.write_text("some text of mine")
    lines = []
    c = resolve_corpus(p, log=lines.append)
    assert c.text == "some text of mine" and c.name == "file"
    assert lines == [c.description] and str(p) in lines[0]
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_corpus(isolated / "missing.txt", log=lines.append)


@pytest.mark.parametrize("where", ["env_dir", "env_file", "cache", "cwd_data", "parent_data"])
def test_local_tiny_shakespeare_is_found(isolated, monkeypatch, where):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    folder = {
        "env_dir": isolated / "envdir",
        "env_file": isolated / "envdir",
        "cache": isolated / "cache",
        "cwd_data": Path.cwd() / "data",
        "parent_data": Path.cwd().parent / "data",
    }[where]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tinyshakespeare.txt").write_text(text)
    if where == "env_dir":
        monkeypatch.setenv("CUTEGRAD_DATA", str(folder))
    if where == "env_file":
        monkeypatch.setenv("CUTEGRAD_DATA", str(folder / "tinyshakespeare.txt"))
    lines = []
    c = resolve_corpus(download=False, log=lines.append)
    assert c.name == "tinyshakespeare" and c.text == text
    assert "tiny Shakespeare" in lines[-1] and str(folder) in lines[-1]


def test_download_failure_falls_back_to_embedded_fast(isolated):
    import time

    lines = []
    t0 = time.monotonic()
    c = resolve_corpus(url="http://127.0.0.1:9/tinyshakespeare.txt", timeout=2.0, log=lines.append)
    assert time.monotonic() - t0 < 5.0
    assert c.name == "embedded" and c.text == embedded_corpus()
    assert "not downloadable" in lines[0] and "embedded" in lines[-1]


def test_successful_download_is_cached(isolated, monkeypatch):
    body = ("x" * 79 + "\n") * 13_000
    monkeypatch.setattr(corpus_mod, "_download", lambda url, timeout: body.encode())
    c = resolve_corpus(log=lambda m: None)
    assert c.name == "tinyshakespeare" and c.text == body
    assert (isolated / "cache" / "tinyshakespeare.txt").read_text() == body
    # A short answer (an error page) is not accepted or cached.
    (isolated / "cache" / "tinyshakespeare.txt").unlink()
    monkeypatch.setattr(corpus_mod, "_download", lambda url, timeout: b"<html>404</html>")
    assert resolve_corpus(log=lambda m: None).name == "embedded"
    assert not (isolated / "cache" / "tinyshakespeare.txt").exists()


def test_offline_env_skips_download(isolated, monkeypatch):
    monkeypatch.setenv("CUTEGRAD_OFFLINE", "1")
    monkeypatch.setattr(corpus_mod, "_download", lambda url, timeout: pytest.fail("download attempted while offline"))
    assert resolve_corpus(log=lambda m: None).name == "embedded"


def test_embedded_corpus_is_substantial_english():
    text = embedded_corpus()
    assert 100_000 <= len(text.encode("utf-8")) <= 400_000
    words = text.lower().split()
    common = sum(w.strip(".,;:!?\"'()") in {"the", "and", "of", "to", "a", "in"} for w in words)
    assert common / len(words) > 0.1  # function words make up a large share of real English
    assert len(set(words)) > 3000


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not present")
def test_shared_tiny_shakespeare_via_env(isolated, monkeypatch):
    monkeypatch.setenv("CUTEGRAD_DATA", str(SHAKESPEARE.parent))
    c = resolve_corpus(download=False, log=lambda m: None)
    assert len(c.text) == 1_115_394 and c.text.startswith("First Citizen:")

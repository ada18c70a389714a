"""The sequence-reversal task: exact format, seeding, disjoint splits, accuracy."""

import numpy as np
import pytest

from cutegrad.data import DataLoader, IGNORE_INDEX, ReversalTask, collate_numpy, exact_sequence_accuracy


def test_default_format_matches_design():
    task = ReversalTask()
    assert (task.vocab_size, task.seq_len, task.length) == (36, 64, 32)
    assert (task.sep, task.pad, task.n_symbols) == (34, 35, 34)
    content = task.sample_content(5, "train", seed=0)
    inputs, targets = task.encode(content)
    assert inputs.shape == targets.shape == (5, 64)
    assert inputs.dtype == targets.dtype == np.int64
    for c, x, y in zip(content, inputs, targets):
        full = np.concatenate([c, [34], c[::-1]])  # 65 tokens
        np.testing.assert_array_equal(x, full[:64])
        np.testing.assert_array_equal(y[32:], c[::-1])
        assert (y[:32] == IGNORE_INDEX).all()
        # Next-token alignment: every supervised target is the next input token (or the last token).
        np.testing.assert_array_equal(y[32:63], x[33:64])
    assert content.min() >= 0 and content.max() < 34


def test_short_content_is_padded_and_masked():
    task = ReversalTask(vocab_size=10, seq_len=12, length=4)
    c = np.array([[1, 2, 3, 4]])
    x, y = task.encode(c)
    np.testing.assert_array_equal(x[0], [1, 2, 3, 4, 8, 4, 3, 2, 1, 9, 9, 9])
    np.testing.assert_array_equal(y[0], [-100, -100, -100, -100, 4, 3, 2, 1, -100, -100, -100, -100])


def test_sampling_is_seeded():
    task = ReversalTask()
    a = task.sample(100, "train", seed=7)
    b = task.sample(100, "train", seed=7)
    c = task.sample(100, "train", seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    s1 = task.batches(16, seed=3)
    s2 = task.batches(16, seed=3)
    for _ in range(3):
        np.testing.assert_array_equal(next(s1)[0], next(s2)[0])


@pytest.mark.parametrize("vocab,length", [(36, 32), (4, 3), (6, 3), (12, 5)])
def test_splits_are_disjoint(vocab, length):
    task = ReversalTask(vocab_size=vocab, seq_len=2 * length, length=length, heldout_fraction=0.3)
    train = task.sample_content(20000, "train", seed=0)
    held = task.sample_content(5000, "heldout", seed=0)
    assert not task.split_of(train).any()
    assert task.split_of(held).all()
    train_set = {r.tobytes() for r in train}
    assert not any(r.tobytes() in train_set for r in held)
    if vocab ** length <= 100:
        # Tiny spaces: the two splits partition every possible sequence.
        all_seqs = np.array(np.meshgrid(*[np.arange(vocab - 2)] * length, indexing="ij")).reshape(length, -1).T
        flags = task.split_of(all_seqs)
        assert {r.tobytes() for r in held} == {r.tobytes() for r in all_seqs[flags]}
        assert train_set == {r.tobytes() for r in all_seqs[~flags]}


def test_empty_split_raises_instead_of_spinning():
    task = ReversalTask(vocab_size=5, seq_len=4, length=2, heldout_fraction=0.05)
    every = np.array([[a, b] for a in range(3) for b in range(3)])
    assert not task.split_of(every).any()  # the fixed hash puts all 9 sequences in train
    with pytest.raises(ValueError, match="heldout split is empty"):
        task.sample_content(4, "heldout", seed=0)


def test_heldout_fraction_is_respected():
    task = ReversalTask(heldout_fraction=0.1)
    uniform = np.random.default_rng(1).integers(0, 34, size=(200_000, 32))
    assert abs(task.split_of(uniform).mean() - 0.1) < 0.005


def test_dataset_and_loader():
    task = ReversalTask()
    ds = task.dataset(50, "heldout", seed=2)
    assert len(ds) == 50 and task.split_of(task.sample_content(50, "heldout", seed=2)).all()
    x, y = next(iter(DataLoader(ds, batch_size=8, collate_fn=collate_numpy)))
    assert x.shape == (8, 64) and y.dtype == np.int64


def test_prompts_and_answers():
    task = ReversalTask()
    c = task.sample_content(3, seed=0)
    p, a = task.prompts(c)
    assert p.shape == (3, 33) and (p[:, -1] == task.sep).all()
    np.testing.assert_array_equal(a, c[:, ::-1])
    _, y = task.encode(c)
    np.testing.assert_array_equal(y[:, 32:], a)


def test_exact_sequence_accuracy():
    task = ReversalTask()
    _, y = task.sample(10, seed=0)
    pred = np.where(y == IGNORE_INDEX, 0, y)
    assert exact_sequence_accuracy(pred, y) == 1.0
    pred[3, 40] = (pred[3, 40] + 1) % 34
    pred[7, 63] = (pred[7, 63] + 1) % 34
    assert exact_sequence_accuracy(pred, y) == pytest.approx(0.8)
    pred[0, 5] = 17  # ignored position: no effect
    assert exact_sequence_accuracy(pred, y) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="same"):
        exact_sequence_accuracy(pred[:, :10], y)
    with pytest.raises(ValueError, match="no sequences"):
        exact_sequence_accuracy(np.zeros((0, 4)), np.zeros((0, 4)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        ReversalTask(vocab_size=3)
    with pytest.raises(ValueError, match="length"):
        ReversalTask(seq_len=64, length=33)
    with pytest.raises(ValueError, match="heldout_fraction"):
        ReversalTask(heldout_fraction=1.0)
    task = ReversalTask()
    with pytest.raises(ValueError, match="split"):
        task.sample(1, "validation")
    with pytest.raises(ValueError, match=r"content symbols must be in \[0, 34\)"):
        task.encode(np.full((1, 32), 34))
    with pytest.raises(ValueError, match="shape"):
        task.encode(np.zeros((1, 31), dtype=np.int64))

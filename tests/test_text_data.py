"""Language-model input: the embedded corpus, packing into windows, hold-out, tokenizers."""

import numpy as np
import pytest
import tensorflow as tf

import tfpar
from tfpar.data import corpus, text


def windows_of(documents, seq_len):
    ds = text.lm_windows(tf.data.Dataset.from_tensor_slices(documents), text.ByteTokenizer(),
                         seq_len)
    return [(bytes(x.numpy().astype("uint8")).decode(), bytes(y.numpy().astype("uint8")).decode())
            for x, y in ds]


def test_documents_are_packed_end_to_end_into_next_token_windows():
    assert windows_of(["abcd", "efgh"], 3) == [("abc", "bcd"), ("efg", "fgh")]
    # A window may span two documents; the tail shorter than a window is dropped.
    assert windows_of(["abc", "defgh", "ij"], 3) == [("abc", "bcd"), ("efg", "fgh")]


def test_held_out_windows_are_every_20th_and_disjoint_from_training():
    windows = tf.data.Dataset.range(100).map(lambda i: (i, i))
    val = [int(x) for x, _ in text.hold_out(windows, validation=True)]
    train = [int(x) for x, _ in text.hold_out(windows, validation=False)]
    assert val == list(range(0, 100, 20)) and sorted(val + train) == list(range(100))


def test_a_resumed_input_continues_where_the_checkpointed_run_stopped():
    strategy = tfpar.OneDevice()
    windows = tf.data.Dataset.range(1000).map(lambda i: (i, i))
    full = text.lm_batches(windows, strategy, global_batch_size=8, train=True, seed=3)
    resumed = text.lm_batches(windows, strategy, global_batch_size=8, train=True, seed=3,
                              skip_batches=5)
    expected = [x.numpy() for x, _ in full.take(7)][5:]
    np.testing.assert_array_equal(np.stack(expected),
                                  np.stack([x.numpy() for x, _ in resumed.take(2)]))


def test_the_embedded_corpus_is_the_standard_library_without_its_tests(tmp_path):
    files = corpus.stdlib_files()
    assert len(files) > 300 and all(not rel.startswith(("test/", "site-packages/"))
                                    for rel, _ in files)
    builder = corpus.prepare(corpus.DEFAULT_DATASET, str(tmp_path))
    splits = builder.info.splits
    assert splits["train"].num_examples + splits["validation"].num_examples == len(files)
    assert 0.02 < splits["validation"].num_examples / len(files) < 0.09
    again = corpus.prepare(corpus.DEFAULT_DATASET, str(tmp_path))  # prepared once
    assert again.is_prepared()
    first = next(iter(text.tfds_documents(corpus.DEFAULT_DATASET, "train", str(tmp_path))))
    assert b"import" in first.numpy() or b"def " in first.numpy()


@pytest.mark.parametrize("spec, message", [
    ("nope", "use 'bytes' or 'package.module:name'"),
    ("no_such_module_xyz:Tok", "cannot load it"),
    ("json:dumps", "calling it with no arguments failed"),
    ("os:sep", "lacks vocab_size, encode or decode"),
])
def test_a_tokenizer_that_cannot_work_is_refused_naming_it(spec, message):
    with pytest.raises(text.TextDataError, match=message):
        text.load_tokenizer(spec)


def test_byte_tokenizer_round_trips_utf8():
    tokenizer = text.ByteTokenizer()
    ids = tokenizer.encode(tf.constant("naïve ✓"))
    assert ids.dtype == tf.int32 and tokenizer.decode(ids.numpy()) == "naïve ✓"


def test_missing_split_or_feature_names_what_the_dataset_has(tmp_path):
    corpus.prepare(corpus.DEFAULT_DATASET, str(tmp_path))
    with pytest.raises(text.TextDataError, match=r"has no split 'test'.*\['train', 'validation'\]"):
        text.tfds_documents(corpus.DEFAULT_DATASET, "test", str(tmp_path))
    with pytest.raises(text.TextDataError, match="has no feature 'content'"):
        text.tfds_documents(corpus.DEFAULT_DATASET, "train", str(tmp_path), text_key="content")


def test_the_train_default_is_the_embedded_corpus():
    from tfpar.train import TrainConfig

    assert TrainConfig().dataset == corpus.DEFAULT_DATASET


def test_one_call_gives_global_batches_of_a_tfds_split(tmp_path):
    corpus.prepare(corpus.DEFAULT_DATASET, str(tmp_path))
    val = text.tfds_lm_batches(corpus.DEFAULT_DATASET, "validation", tfpar.OneDevice(),
                               seq_len=16, global_batch_size=4, train=False,
                               data_dir=str(tmp_path), eval_batches=3)
    batches = [(x.numpy(), y.numpy()) for x, y in val]
    assert len(batches) == 3 and batches[0][0].shape == (4, 16)
    np.testing.assert_array_equal(batches[0][0][:, 1:], batches[0][1][:, :-1])  # next tokens

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
    ("nope", "use 'bytes', 'bpe:VOCAB', a tokenizer.json path or 'package.module:name'"),
    ("bpe:100", r"\[257, 65536\]"),
    ("bpe:many", "e.g. --tokenizer=bpe:4096"),
    ("bpe:4096", "is trained on the training text"),  # no corpus given
    ("/no/such/tokenizer.json", "no such file"),
    ("no_such_module_xyz:Tok", "cannot load it"),
    ("json:dumps", "calling it with no arguments failed"),
    ("os:sep", "lacks vocab_size, encode or decode"),
])
def test_a_tokenizer_that_cannot_work_is_refused_naming_it(spec, message):
    with pytest.raises(text.TextDataError, match=message):
        text.load_tokenizer(spec)


def test_a_json_file_that_is_not_a_tokenizer_is_refused_naming_it(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"not": "a tokenizer"}')
    with pytest.raises(text.TextDataError, match="is not a tokenizers-format tokenizer.json"):
        text.load_tokenizer(str(path))


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


# ------------------------------------------------------------------ BPE
def _python_files(tmp_path):
    """A small corpus of real Python: four standard-library modules."""
    import dataclasses
    import json.decoder
    import json.encoder
    import os

    (tmp_path / "src").mkdir()
    for module in (os, json.decoder, json.encoder, dataclasses):
        (tmp_path / "src" / os.path.basename(module.__file__)).write_text(
            open(module.__file__, encoding="utf-8").read())
    return str(tmp_path / "src" / "*.py")


def test_bpe_is_trained_offline_once_cached_and_round_trips_source_code(tmp_path):
    pattern = _python_files(tmp_path)
    corpus = text.TokenizerCorpus.of_files(pattern, str(tmp_path / "cache"))
    tokenizer = text.load_tokenizer("bpe:600", corpus)
    assert tokenizer.vocab_size == 600
    cached = list((tmp_path / "cache").glob("files-*-bpe600.json"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = text.load_tokenizer("bpe:600", corpus)  # read from the cache, not trained again
    assert cached[0].stat().st_mtime_ns == mtime and again.path == tokenizer.path
    source = "def f(x):\n\tif x:  # naïve ✓\n        return {'a': [1, 2]}\n"
    ids = tokenizer.encode(tf.constant(source)).numpy()
    assert ids.dtype == np.int32 and tokenizer.decode(ids) == source  # lossless, spaces kept
    assert len(ids) < 0.7 * len(source.encode())  # merges learnt from the code
    # In a tf.data map (graph mode), as the training input uses it.
    mapped = next(iter(tf.data.Dataset.from_tensors(source).map(tokenizer.encode)))
    assert mapped.numpy().tolist() == ids.tolist()
    # A saved tokenizer.json loads by path and encodes the same.
    assert text.load_tokenizer(tokenizer.path).encode(tf.constant(source)).numpy().tolist() \
        == ids.tolist()
    # Changed files are another corpus: another cache key.
    (tmp_path / "src" / "extra.py").write_text("x = 1\n")
    other = text.TokenizerCorpus.of_files(pattern, str(tmp_path / "cache"))
    assert other.key != corpus.key


def test_token_bytes_count_the_utf8_bytes_each_id_stands_for(tmp_path):
    corpus = text.TokenizerCorpus.of_files(_python_files(tmp_path), str(tmp_path / "cache"))
    tokenizer = text.load_tokenizer("bpe:700", corpus)
    sizes = text.token_bytes(tokenizer)
    for source in ("import os\n", "naïve ✓ → ok\n    pass\n"):
        ids = tokenizer.encode(tf.constant(source)).numpy()
        assert sizes[ids].sum() == len(source.encode("utf-8"))
    assert text.token_bytes(text.ByteTokenizer()).tolist() == [1] * 256


def test_bits_per_byte_arithmetic(tmp_path):
    from tfpar.train import job

    # Uniform over 256 bytes is 8 bits per byte, with bytes or with 4-byte tokens.
    assert job.bits_per_byte(np.log(256), 1.0) == pytest.approx(8.0)
    assert job.bits_per_byte(4 * np.log(256), 4.0) == pytest.approx(8.0)
    corpus = text.TokenizerCorpus.of_files(_python_files(tmp_path), str(tmp_path / "cache"))
    tokenizer = text.load_tokenizer("bpe:700", corpus)
    documents = tf.data.Dataset.from_tensor_slices(["def add(a, b):\n    return a + b\n" * 40])
    windows = text.lm_windows(documents, tokenizer, seq_len=8)
    targets = np.concatenate([y for _, y in windows.take(5).as_numpy_iterator()])
    expected = sum(len(tokenizer.decode([int(i)]).encode()) for i in targets) / targets.size
    assert job.bytes_per_token(windows, tokenizer, 5) == pytest.approx(expected)
    byte_windows = text.lm_windows(documents, text.ByteTokenizer(), seq_len=8)
    assert job.bytes_per_token(byte_windows, text.ByteTokenizer(), 5) == 1.0

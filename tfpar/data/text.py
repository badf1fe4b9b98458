"""Language-model input: documents -> tokens -> windows -> global batches.

A *document* is one text (a file, one TFDS example). Documents are
tokenized, packed end to end (GPT-style: no padding, a window may span two
documents) and cut into windows of `seq_len + 1` tokens; each window gives
the inputs `w[:-1]` and the next-token targets `w[1:]`. Batches are global
batches from `tfpar.data.batch_for`, so they are sharded correctly for
every strategy (DATA sharding: every worker reads the same, seeded order and
keeps its slice of each batch).

Sources, all through the same path::

    docs = text.tfds_documents("python_stdlib", "train", data_dir)   # the default
    docs = text.tfds_documents("tiny_shakespeare", "train", data_dir) # any TFDS text
    docs = text.file_documents("/data/books/*.txt")                   # local files
    windows = text.lm_windows(docs, text.ByteTokenizer(), seq_len=128)
    train = text.lm_batches(windows, strategy, global_batch_size=64, train=True, seed=0)

Tokenizers: UTF-8 bytes (`ByteTokenizer`: 256 ids), a byte-level BPE
trained on the training text at first use and cached (`bpe:V`,
`tfpar.data.bpe`), a saved `tokenizer.json`, or any object with
`vocab_size`, a graph-mode `encode(tf.string scalar) -> int32 vector` and
`decode(list[int]) -> str` (see `Tokenizer`; `tfpar train
--tokenizer=module:attr` loads one). `load_tokenizer(spec, corpus)` makes
each.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import importlib
import os
from typing import Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import tensorflow as tf

from tfpar.data import bpe
from tfpar.data.distributed import batch_for

# Documents are packed this many at a time; each group loses its last
# partial window (at most seq_len tokens per group).
PACK_DOCUMENTS = 64
# Sources with no validation split hold out every VALIDATION_EVERY-th window.
VALIDATION_EVERY = 20


class TextDataError(ValueError):
    """Text input that cannot work: a tokenizer, split or feature that is not there."""


class TextNotFoundError(TextDataError, FileNotFoundError):
    """Text that is not where it was said to be: files that match nothing, a TFDS
    dataset that is unknown or not prepared."""


@runtime_checkable
class Tokenizer(Protocol):
    """What `tfpar train` needs of a tokenizer.

    Example (a real subword tokenizer, with tensorflow-text installed)::

        import tensorflow_text as tft

        class SentencePiece:
            def __init__(self, model_path="/models/spm.model"):
                self._spm = tft.SentencepieceTokenizer(tf.io.gfile.GFile(model_path, "rb").read())
                self.vocab_size = int(self._spm.vocab_size())
            def encode(self, text):               # tf.string scalar -> int32 vector
                return tf.cast(self._spm.tokenize(text), tf.int32)
            def decode(self, ids):                 # list of ints -> str
                return self._spm.detokenize(ids).numpy().decode()

        $ tfpar train --tokenizer=my_tokenizers:SentencePiece
    """

    vocab_size: int

    def encode(self, text: tf.Tensor) -> tf.Tensor: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 ids, lossless, nothing to download."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: tf.Tensor) -> tf.Tensor:
        return tf.cast(tf.io.decode_raw(text, tf.uint8), tf.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, np.int64)


def load_tokenizer(spec: str, corpus: TokenizerCorpus | None = None) -> Tokenizer:
    """The tokenizer `spec` names.

    - "bytes": UTF-8 bytes (256 ids);
    - "bpe:V": a byte-level BPE of V ids trained on `corpus` at first use and
      cached (`tfpar.data.bpe`);
    - a path to a saved `tokenizer.json` (Hugging Face `tokenizers` format);
    - "package.module:name": a Tokenizer class, factory or instance.
    """
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith(bpe.PREFIX):
        try:
            vocab = bpe.parse_vocab(spec)
        except ValueError as e:
            raise TextDataError(str(e)) from None
        if corpus is None:
            raise TextDataError(f"--tokenizer={spec!r} is trained on the training text; pass a "
                                "TokenizerCorpus (tfpar train does), or a saved tokenizer.json.")
        return corpus.train_bpe(vocab)
    if spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise TextNotFoundError(f"--tokenizer={spec!r}: no such file; give the path of a "
                                    "saved tokenizer.json (a tfpar train output dir has one), "
                                    "or bpe:VOCAB to train one.")
        try:
            return bpe.BPETokenizer(spec)
        except Exception as e:  # noqa: BLE001 - the library's parse errors have no common type
            raise TextDataError(f"--tokenizer={spec!r} is not a tokenizers-format "
                                f"tokenizer.json ({str(e).splitlines()[0]}); give a file "
                                "saved by tfpar train or Hugging Face tokenizers.") from None
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise TextDataError(f"--tokenizer={spec!r}: use 'bytes', 'bpe:VOCAB', a tokenizer.json "
                            "path or 'package.module:name' (a class, factory or instance with "
                            "vocab_size, encode and decode).")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise TextDataError(f"--tokenizer={spec!r}: cannot load it ({e}); check the spelling "
                            "and that the module is importable (installed or on PYTHONPATH)."
                            ) from e
    tokenizer = found
    if isinstance(found, type) or (callable(found) and not isinstance(found, Tokenizer)):
        try:
            tokenizer = found()  # a class or a factory
        except TypeError as e:
            raise TextDataError(f"--tokenizer={spec!r}: calling it with no arguments failed "
                                f"({e}); name a class or factory that takes none, or an "
                                "instance.") from e
    if not isinstance(tokenizer, Tokenizer):
        raise TextDataError(f"--tokenizer={spec!r} gave {type(tokenizer).__name__}, which lacks "
                         "vocab_size, encode or decode (see tfpar.data.text.Tokenizer).")
    return tokenizer


def token_bytes(tokenizer: Tokenizer) -> np.ndarray:
    """How many UTF-8 bytes each id stands for (bits per byte = bits per token x
    tokens / bytes). Tokenizers without a `token_bytes()` of their own are
    measured by decoding each id alone (exact for whole characters)."""
    own = getattr(tokenizer, "token_bytes", None)
    if own is not None:
        return np.asarray(own(), np.int64)
    return np.asarray([len(tokenizer.decode([i]).encode("utf-8"))
                       for i in range(tokenizer.vocab_size)], np.int64)


@dataclasses.dataclass(frozen=True)
class TokenizerCorpus:
    """The training text a `bpe:V` tokenizer is trained on, and where it is cached.

    Made from the run's source: a TFDS split (cached in its data dir, keyed by
    dataset, version and split) or local files (keyed by their names, sizes
    and times). Example::

        corpus = TokenizerCorpus.of_tfds("python_stdlib", "train")
        tokenizer = load_tokenizer("bpe:4096", corpus)
    """

    texts: Callable[[], Iterable[str]]
    cache_dir: str
    key: str

    def train_bpe(self, vocab: int) -> bpe.BPETokenizer:
        return bpe.trained(vocab, self.texts, os.path.join(self.cache_dir,
                                                           f"{self.key}-bpe{vocab}.json"))

    @classmethod
    def of_tfds(cls, name: str, split: str, data_dir: str | None = None,
                text_key: str = "text", download: bool = False) -> "TokenizerCorpus":
        from tfpar.data.corpus import default_data_dir, prepare

        data_dir = data_dir or default_data_dir()
        builder = prepare(name, data_dir, download=download)

        def texts():
            for value in tfds_documents(name, split, data_dir, text_key).as_numpy_iterator():
                yield value.decode("utf-8", "replace")

        return cls(texts, os.path.join(data_dir, "tfpar_tokenizers"),
                   f"{name}-{builder.info.version}-{split}")

    @classmethod
    def of_files(cls, pattern: str, cache_dir: str) -> "TokenizerCorpus":
        paths = sorted(globlib.glob(pattern))
        if not paths:
            raise TextNotFoundError(f"--text_files={pattern!r}: no file matches; check the path, "
                                    "and quote the glob so the shell leaves it to tfpar.")

        def texts():
            for p in paths:
                with open(p, encoding="utf-8", errors="replace") as f:
                    yield f.read()

        return cls(texts, cache_dir, f"files-{bpe.files_key(paths)}")


# ------------------------------------------------------------------ sources
def tfds_documents(name: str, split: str, data_dir: str | None = None,
                   text_key: str = "text", download: bool = False) -> tf.data.Dataset:
    """The `text_key` feature of every example of a TFDS split (prepared offline)."""
    from tfpar.data.corpus import prepare

    builder = prepare(name, data_dir, download=download)
    if split not in builder.info.splits:
        raise TextDataError(f"TFDS dataset {name!r} has no split {split!r}; it has "
                         f"{sorted(builder.info.splits)}.")
    features = builder.info.features
    if text_key not in features:
        raise TextDataError(f"TFDS dataset {name!r} has no feature {text_key!r}; its features "
                         f"are {sorted(features)}. Pass --text_key.")
    return builder.as_dataset(split=split, shuffle_files=False).map(
        lambda example: example[text_key], num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)


def has_split(name: str, split: str, data_dir: str | None = None) -> bool:
    from tfpar.data.corpus import prepare

    return split in prepare(name, data_dir).info.splits


def file_documents(files: str | Sequence[str]) -> tf.data.Dataset:
    """Each file (a glob or a list) is one document, in sorted order."""
    paths = sorted(globlib.glob(files)) if isinstance(files, str) else list(files)
    if not paths:
        raise TextNotFoundError(f"--text_files={files!r}: no file matches; check the path, "
                                "and quote the glob so the shell leaves it to tfpar.")
    return tf.data.Dataset.from_tensor_slices(paths).map(
        tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# ------------------------------------------------------------------ windows
def pretokenized_windows(corpus: TokenizerCorpus, tokenizer: bpe.BPETokenizer, seq_len: int,
                         shuffle_documents: bool = False,
                         seed: int | None = None) -> tf.data.Dataset:
    """(inputs, targets) windows of `corpus`, from token ids computed once and cached.

    Encoding with a BPE in the input pipeline would run Python for every
    document of every epoch and of every worker, and hold up the first batch
    while the shuffle buffer fills (about 30 s for the default corpus on 2
    cores). Instead the corpus is encoded once (batches of documents on the
    tokenizer's own threads), stored next to the tokenizer
    (`<key>-tokens-<tokenizer digest>.npz`: the ids and each document's
    offset) under the same lock, and every run reads the array. Documents are
    shuffled once by `seed` (as `lm_windows` does), concatenated and cut into
    windows of `seq_len + 1` tokens; the last partial window is dropped.
    """
    path = os.path.join(corpus.cache_dir, f"{corpus.key}-tokens-{tokenizer.digest}.npz")
    if not os.path.exists(path):
        with bpe.cache_lock(corpus.cache_dir):
            if not os.path.exists(path):
                documents = tokenizer.encode_documents(corpus.texts())
                offsets = np.cumsum([0] + [len(d) for d in documents])
                temporary = f"{path}.tmp{os.getpid()}.npz"
                np.savez(temporary, ids=np.concatenate(documents or [np.zeros(0, np.int32)]),
                         offsets=offsets)
                os.replace(temporary, path)
    with np.load(path) as cached:
        ids, offsets = cached["ids"], cached["offsets"]
    order = np.arange(len(offsets) - 1)
    if shuffle_documents:
        order = np.random.RandomState(seed).permutation(order)
    stream = np.concatenate([ids[offsets[i]:offsets[i + 1]] for i in order] or [ids[:0]])
    width = seq_len + 1
    windows = stream[: len(stream) // width * width].reshape(-1, width)
    return tf.data.Dataset.from_tensor_slices(windows).map(lambda w: (w[:-1], w[1:]))


def lm_windows(documents: tf.data.Dataset, tokenizer: Tokenizer, seq_len: int,
               shuffle_documents: bool = False, seed: int | None = None) -> tf.data.Dataset:
    """(inputs, targets) pairs of `seq_len` tokens, packed across documents.

    Worked example, seq_len=3, documents "abcd" and "efgh" (bytes):
    tokens a b c d e f g h -> windows [a b c d], [e f g h] -> inputs
    [a b c], targets [b c d]; inputs [e f g], targets [f g h].
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be >= 1.")
    if shuffle_documents:
        documents = documents.shuffle(1024, seed=seed, reshuffle_each_iteration=False)
    width = seq_len + 1

    def cut(tokens):  # one group's tokens -> [n, seq_len + 1]
        n = tf.shape(tokens)[0] // width
        return tf.data.Dataset.from_tensor_slices(tf.reshape(tokens[: n * width], [n, width]))

    # A tokenizer's encode is graph code already: autograph would re-read its source
    # file, which a test suite that rewrites or edits modules can make stale (it
    # then converts whatever function now sits at those lines).
    encode = tf.autograph.experimental.do_not_convert(tokenizer.encode)
    windows = (documents
               .map(encode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .ragged_batch(PACK_DOCUMENTS)
               .map(lambda group: group.flat_values)
               .flat_map(cut))
    return windows.map(lambda w: (w[:-1], w[1:]))


def hold_out(windows: tf.data.Dataset, validation: bool) -> tf.data.Dataset:
    """Every VALIDATION_EVERY-th window (validation) or all the others (training),
    for sources that have no validation split of their own."""
    keep = (lambda i, _: i % VALIDATION_EVERY == 0) if validation else \
        (lambda i, _: i % VALIDATION_EVERY != 0)
    return windows.enumerate().filter(keep).map(lambda _, w: w)


def lm_batches(windows: tf.data.Dataset, strategy, *, global_batch_size: int, train: bool,
               seed: int = 0, shuffle_buffer: int = 10_000, eval_batches: int | None = None,
               skip_batches: int = 0) -> tf.data.Dataset:
    """Global batches of windows for `strategy`.

    Training: an endless, seeded shuffle (every worker draws the same order),
    starting `skip_batches` batches in, so a resumed run continues the data
    where the checkpointed run left it. Evaluation: the first `eval_batches`
    batches, in order, cached: the same examples at every evaluation.
    """
    if train:
        windows = windows.repeat().shuffle(shuffle_buffer, seed=seed,
                                           reshuffle_each_iteration=True)
        batches = batch_for(windows, strategy, global_batch_size=global_batch_size)
        return batches.skip(skip_batches) if skip_batches else batches
    batches = batch_for(windows, strategy, global_batch_size=global_batch_size)
    if eval_batches is not None:
        batches = batches.take(eval_batches)
    return batches.cache()


def tfds_lm_batches(name: str, split: str, strategy, *, seq_len: int, global_batch_size: int,
                    train: bool, tokenizer: Tokenizer | None = None,
                    data_dir: str | None = None, eval_batches: int | None = None,
                    seed: int = 0) -> tf.data.Dataset:
    """Global batches of (inputs, targets) windows from a TFDS text split, in one call.

    Training batches come from documents shuffled once by `seed` (see
    `lm_batches` for the rest). Example::

        train = tfds_lm_batches("python_stdlib", "train", strategy, seq_len=128,
                                global_batch_size=64, train=True)
        val = tfds_lm_batches("python_stdlib", "validation", strategy, seq_len=128,
                              global_batch_size=64, train=False, eval_batches=8)
    """
    windows = lm_windows(tfds_documents(name, split, data_dir), tokenizer or ByteTokenizer(),
                         seq_len, shuffle_documents=train, seed=seed)
    return lm_batches(windows, strategy, global_batch_size=global_batch_size, train=train,
                      seed=seed, eval_batches=eval_batches)

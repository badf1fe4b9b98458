"""A byte-level BPE tokenizer trained on the training text at first use, offline.

`--tokenizer=bpe:4096` trains a GPT-2-style byte-level BPE (Hugging Face
`tokenizers`: every byte is a token of its own, so any text encodes
losslessly and indentation survives) with a vocabulary of 4096 on the
run's training documents, and caches it as a `tokenizer.json`:

- TFDS datasets: `<data_dir>/tfpar_tokenizers/<dataset>-<version>-<split>-bpe<V>.json`,
  made under the same lock as the prepared dataset, so local workers and
  pods on one volume train it once and all read the same file;
- local files (`--text_files`): keyed by a hash of their names, sizes and
  modification times.

`--tokenizer=path/to/tokenizer.json` loads a saved one (a run's output dir
holds a copy: `tfpar generate` reads it). Example::

    tokenizer = bpe.trained(4096, texts=lambda: iter(["def f(x):\\n    return x\\n"]),
                            path="/tmp/bpe.json")
    ids = tokenizer.encode(tf.constant("def f"))    # int32 vector, in graph or eagerly
    tokenizer.decode(ids.numpy())                   # "def f"

Why `tokenizers` and not sentencepiece (both are in the pip registry, both
train offline): its byte-level pre-tokenizer keeps every space and newline of
source code as it is; sentencepiece normalises whitespace unless told not to
and needs byte fallback for unseen characters. Training on the 12 MB
standard-library corpus takes about 5 s on 2 cores (BUILD_NOTES.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from typing import Callable, Iterable, Sequence

import numpy as np

PREFIX = "bpe:"
MIN_VOCAB, MAX_VOCAB = 257, 65536  # bytes + at least one merge; ids fit uint16


class BPETokenizer:
    """A byte-level BPE from a `tokenizer.json` (see the module docstring)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = path
        self._tokenizer = HFTokenizer.from_file(path)
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.name = f"bpe:{self.vocab_size}"

    def encode(self, text):
        """A tf.string scalar -> int32 ids; works inside tf.data maps and tf.function."""
        import tensorflow as tf

        def ids(value):
            value = value.item() if isinstance(value, np.ndarray) else value  # eager: 0-d array
            return np.asarray(self._tokenizer.encode(value.decode("utf-8", "replace")).ids,
                              np.int32)

        out = tf.numpy_function(ids, [text], tf.int32, stateful=False)
        out.set_shape([None])
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    @property
    def digest(self) -> str:
        """A short hash of the tokenizer file: cached token ids are keyed by it."""
        with open(self.path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:12]

    def encode_documents(self, texts: Iterable[str], chunk: int = 64) -> list[np.ndarray]:
        """Every text's ids, encoded in batches on the library's own threads."""
        out, batch = [], []
        for text in texts:
            batch.append(text)
            if len(batch) == chunk:
                out += [np.asarray(e.ids, np.int32) for e in self._tokenizer.encode_batch(batch)]
                batch = []
        if batch:
            out += [np.asarray(e.ids, np.int32) for e in self._tokenizer.encode_batch(batch)]
        return out

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes that each id stands for (for bits per byte)."""
        from tokenizers.pre_tokenizers import ByteLevel

        if not isinstance(self._tokenizer.pre_tokenizer, ByteLevel):
            return np.asarray([len(self._tokenizer.decode([i]).encode("utf-8"))
                               for i in range(self.vocab_size)], np.int64)
        # Byte-level tokens are strings over a 256-character alphabet, one
        # character per byte.
        alphabet = set(ByteLevel.alphabet())
        sizes = np.zeros(self.vocab_size, np.int64)
        for token, i in self._tokenizer.get_vocab().items():
            sizes[i] = sum(1 for c in token if c in alphabet)
        return sizes


def parse_vocab(spec: str) -> int:
    """`bpe:V` -> V, checked (ValueError naming the rule). Pure Python: the
    flag is checked with it before TensorFlow starts."""
    value = spec[len(PREFIX):]
    if not value.isdigit() or not MIN_VOCAB <= int(value) <= MAX_VOCAB:
        raise ValueError(f"--tokenizer={spec!r}: the BPE vocabulary must be an integer in "
                            f"[{MIN_VOCAB}, {MAX_VOCAB}] (256 bytes and the merges), e.g. "
                            "--tokenizer=bpe:4096.")
    return int(value)


@contextlib.contextmanager
def cache_lock(directory: str):
    """Serializes writing cached tokenizers and token ids between processes."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".tfpar-tokenizer.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def trained(vocab_size: int, texts: Callable[[], Iterable[str]], path: str) -> BPETokenizer:
    """The BPE cached at `path`, trained on `texts()` first if it is not there.

    Processes that share the directory train it once: the first takes the
    lock and writes `path` atomically (a temporary file renamed), the others
    wait and read it.
    """
    if os.path.exists(path):
        return BPETokenizer(path)
    with cache_lock(os.path.dirname(os.path.abspath(path))):
        if not os.path.exists(path):
            from tokenizers import Tokenizer as HFTokenizer
            from tokenizers import decoders, models, pre_tokenizers, trainers

            tokenizer = HFTokenizer(models.BPE())
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tokenizer.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            tokenizer.train_from_iterator(texts(), trainer)
            temporary = f"{path}.tmp{os.getpid()}"
            tokenizer.save(temporary)
            os.replace(temporary, path)
    return BPETokenizer(path)


def files_key(paths: Sequence[str]) -> str:
    """A short hash of files' names, sizes and modification times."""
    digest = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        digest.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]

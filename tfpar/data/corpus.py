"""The embedded default corpus: the Python standard library's own source files.

Every Python installation carries them, so `tfpar train` has real text to
learn from on a machine with no network (most training clusters, every CI
machine): about 460 files and 8.8 MB of English-commented Python on CPython
3.11, under the Python Software Foundation License (permissive; see
https://docs.python.org/3/license.html). Test suites, `site-packages`,
vendored tools and generated tables (`encodings`' codec maps, `pydoc_data`'s
documentation text: 2.2 MB that a model would learn as noise) are left out.

The corpus is a TFDS dataset (`python_stdlib`) built by a local builder:
`prepare()` writes it once into a data dir and every later run (or worker)
reads the prepared records, exactly as it would read `tiny_shakespeare` or
any other TFDS dataset::

    builder = tfpar.data.corpus.prepare("python_stdlib", data_dir="/data/tfds")
    ds = builder.as_dataset(split="train")        # {"text": ..., "path": ...}

Files go to the validation split by a hash of their path (1 in 20), so the
split is the same on every machine with the same Python.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import zlib

import tensorflow_datasets as tfds

DEFAULT_DATASET = "python_stdlib"
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
              "encodings", "pydoc_data", "__pycache__", "turtledemo"}
VALIDATION_EVERY = 20


def stdlib_files() -> list[tuple[str, str]]:
    """(path relative to the standard library, absolute path) of every source file, sorted."""
    root = os.path.dirname(os.__file__)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                found.append((os.path.relpath(path, root), path))
    return found


def is_validation(relative_path: str) -> bool:
    return zlib.crc32(relative_path.encode()) % VALIDATION_EVERY == 0


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
    """The Python standard library's source files, one example per file."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Source files of the running Python's standard library.",
                     "1.1.0": "Without the generated codec tables (encodings) and pydoc_data."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Source files of the Python standard library of the Python that prepared "
                f"it (here {sys.version.split()[0]}), without test suites. Licence: Python "
                "Software Foundation License Version 2."),
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                                 "path": tfds.features.Text()}),
            homepage="https://docs.python.org/3/license.html",
        )

    def _split_generators(self, dl_manager):
        files = stdlib_files()
        return {
            "train": self._generate_examples([f for f in files if not is_validation(f[0])]),
            "validation": self._generate_examples([f for f in files if is_validation(f[0])]),
        }

    def _generate_examples(self, files):
        for relative, path in files:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield relative, {"text": f.read(), "path": relative}


# Builders whose data is on this machine: preparing them downloads nothing.
LOCAL_BUILDERS = {DEFAULT_DATASET: PythonStdlib}


@contextlib.contextmanager
def _prepare_lock(data_dir: str):
    """Serializes preparation between processes sharing a data dir (local
    workers, or pods on one shared volume): TFDS writes to a temporary
    directory and renames it, and a second writer's rename would fail."""
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, ".tfpar-prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def prepare(name: str, data_dir: str | None = None, download: bool = False):
    """The TFDS builder of `name`, prepared in `data_dir` (once).

    tfpar's local builders (`python_stdlib`) are prepared from files on this
    machine. Any other dataset must already be prepared in `data_dir` unless
    `download=True`: offline, `tfds.load` of a dataset that needs a download
    retries for minutes before failing, so this fails at once with the fix.
    """
    from tfpar.data.text import TextNotFoundError

    data_dir = data_dir or default_data_dir()
    if name not in LOCAL_BUILDERS:
        # Checked before the lock, which would create data_dir: a dataset that
        # cannot be read leaves nothing behind.
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise TextNotFoundError(
                f"TFDS dataset {name!r} is not a dataset TFDS knows; check the name "
                "(`tfds.list_builders()`), or train on local files with --text_files=GLOB, "
                "or on the embedded corpus (no --dataset).") from None
        if builder.is_prepared():
            return builder
        if not download:
            raise TextNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {data_dir!r} and download=False. "
                "Prepare it once on a machine with internet "
                f"(`tfds build {name} --data_dir=...`, or pass "
                "--download) and point --data_dir at it; or train on local files with "
                "--text_files=GLOB, or on the embedded corpus (no --dataset).")
    with _prepare_lock(data_dir):
        builder = (LOCAL_BUILDERS[name](data_dir=data_dir) if name in LOCAL_BUILDERS
                   else tfds.builder(name, data_dir=data_dir))
        if builder.is_prepared():
            return builder
        builder.download_and_prepare()
        return builder

"""Fix: directory creation races between workers.

Keras callbacks (ModelCheckpoint, BackupAndRestore) and saving_lib create
directories with "if not exists(d): os.makedirs(d)"; two workers sharing a
checkpoint directory both see it missing and one fails with FileExistsError.
Creating a directory that a peer just created is success.
"""

import functools
import os

from tfpar.compat.patch import Patch


def _make_makedirs(upstream):
    @functools.wraps(upstream)
    def makedirs(path):
        try:
            return upstream(path)
        except FileExistsError:
            if not os.path.isdir(path):
                raise

    makedirs._tfpar_upstream = upstream
    return makedirs


def _file_utils():
    from keras.src.utils import file_utils  # private, pinned

    return file_utils


def _install():
    file_utils = _file_utils()
    file_utils.makedirs = _make_makedirs(file_utils.makedirs)


def _uninstall():
    file_utils = _file_utils()
    file_utils.makedirs = file_utils.makedirs._tfpar_upstream


PATCH = Patch("makedirs_race", "fix", "Keras's exists-then-makedirs in callbacks and saving_lib",
              _install, _uninstall, requires=("keras.src.utils.file_utils:makedirs",))

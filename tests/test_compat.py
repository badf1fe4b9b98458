"""tfpar.compat: the fixes install and uninstall cleanly, and the race fix holds."""

import keras
import pytest
from keras.src.backend.tensorflow import trainer
from keras.src.utils import file_utils

from tfpar import compat


@pytest.fixture(autouse=True)
def fixes_applied():
    compat.apply_keras_fixes()
    yield
    compat.apply_keras_fixes()


def test_fixes_are_applied_by_strategies_and_removable_one_by_one():
    assert compat.keras_needs_fixes()  # pinned Keras is in the verified range
    assert hasattr(trainer.reduce_per_replica, "_tfpar_upstream")
    compat.remove_keras_fixes("reduce_scalar_metrics")
    assert not hasattr(trainer.reduce_per_replica, "_tfpar_upstream")
    assert hasattr(keras.Model.save, "_tfpar_upstream")  # the others stay
    compat.apply_keras_fixes()
    assert hasattr(trainer.reduce_per_replica, "_tfpar_upstream")


def test_applying_twice_does_not_wrap_twice():
    compat.apply_keras_fixes()
    assert not hasattr(keras.Model.save._tfpar_upstream, "_tfpar_upstream")


def test_unknown_fix_name_is_refused():
    with pytest.raises(ValueError, match="unknown fix 'nope'"):
        compat.remove_keras_fixes("nope")


def test_directory_a_peer_just_created_is_not_an_error(tmp_path):
    path = str(tmp_path / "shared")
    file_utils.makedirs(path)
    file_utils.makedirs(path)  # the second worker's call: fine with the fix
    compat.remove_keras_fixes("makedirs_race")
    with pytest.raises(FileExistsError):
        file_utils.makedirs(path)


def test_a_file_in_the_way_is_still_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FileExistsError):
        file_utils.makedirs(str(blocker))

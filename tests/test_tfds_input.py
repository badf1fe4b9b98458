"""TFDS splits as distributed input, offline: a dataset prepared in a local data dir."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import tfpar


class TfparIds(tfds.core.GeneratorBasedBuilder):
    """Examples 0..N-1, each carrying its own id (to count who sees what)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"id": tf.int64}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 40), "test": self._generate_examples(40, 52)}

    def _generate_examples(self, start, stop):
        for i in range(start, stop):
            yield i, {"id": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    TfparIds(data_dir=str(path)).download_and_prepare()
    return str(path)


def test_tfds_split_feeds_every_example_once_to_four_replicas(data_dir):
    strategy = tfpar.DataParallel()
    ds = tfpar.data.from_tfds("tfpar_ids", "train", strategy, data_dir=data_dir,
                              parse=lambda e: e["id"], global_batch_size=8,
                              drop_remainder=False)
    seen = []
    for batch in strategy.experimental_distribute_dataset(ds):
        for local in strategy.experimental_local_results(batch):
            seen.extend(int(i) for i in local.numpy())
    assert sorted(seen) == list(range(40))


def test_tfds_split_that_is_not_prepared_fails_at_once_with_the_fix(tmp_path):
    strategy = tfpar.DataParallel()
    with pytest.raises(FileNotFoundError, match="is not prepared in .* and download=False"):
        tfpar.data.from_tfds("tfpar_ids", "train", strategy, data_dir=str(tmp_path),
                             global_batch_size=8)


def test_tfds_split_trains_a_model(data_dir):
    import keras

    strategy = tfpar.DataParallel()
    ds = tfpar.data.from_tfds(
        "tfpar_ids", "train", strategy, data_dir=data_dir, global_batch_size=8,
        parse=lambda e: (tf.cast(e["id"], tf.float32)[None] / 40.0,
                         tf.cast(e["id"], tf.float32)[None] / 20.0))
    with strategy.scope():
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    history = model.fit(ds, epochs=5, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    assert np.isfinite(history.history["loss"][-1])

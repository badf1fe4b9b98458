"""absl flags of `tfpar train`, and the TrainConfig they make.

The strategy flags (`--strategy`, `--num_simulated_devices`, `--mesh`,
`--pipeline_stages`, `--global_batch_size`, ...) are tfpar's own
(`tfpar.flags`); the model shape flags are `tfpar.models.flags`. No
TensorFlow is imported here, so the CLI starts fast.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from tfpar import flags as tfpar_flags  # noqa: F401  (the strategy flags)
from tfpar.models import flags as model_flags  # noqa: F401  (--model, --layers, ...)

FLAGS = flags.FLAGS
DEFAULT_GLOBAL_BATCH = 32


def _define(define, name, *args, **kwargs):
    if name not in FLAGS:
        define(name, *args, **kwargs)


# Data.
_define(flags.DEFINE_string, "dataset", "python_stdlib",
        "train: TFDS dataset of text. Default: the Python standard library's source files "
        "(prepared locally, no download). Others must be prepared in --data_dir.")
_define(flags.DEFINE_string, "data_dir", None,
        "train: TFDS data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets).")
_define(flags.DEFINE_string, "text_key", "text", "train: the TFDS feature holding the text.")
_define(flags.DEFINE_string, "text_files", None,
        "train: a glob of local text files to train on instead of --dataset (each file is a "
        "document; 1 window in 20 is held out for validation).")
_define(flags.DEFINE_string, "train_split", "train", "train: TFDS split to train on.")
_define(flags.DEFINE_string, "eval_split", "validation",
        "train: TFDS split to evaluate on (if the dataset lacks it, 1 training window in 20 "
        "is held out).")
_define(flags.DEFINE_bool, "download", False,
        "train: let TFDS download --dataset if it is not prepared (needs internet).")
_define(flags.DEFINE_string, "tokenizer", "bytes",
        "train: 'bytes' (UTF-8 bytes, 256 ids) or 'package.module:name' of a tokenizer with "
        "vocab_size, encode and decode (see tfpar.data.text.Tokenizer).")
# Optimization.
_define(flags.DEFINE_integer, "train_steps", 600, "train: optimizer steps in all.")
_define(flags.DEFINE_integer, "eval_every", 100,
        "train: evaluate and checkpoint every this many optimizer steps.")
_define(flags.DEFINE_integer, "eval_batches", 8, "train: global batches per evaluation.")
_define(flags.DEFINE_float, "learning_rate", 3e-3, "train: peak learning rate (AdamW).")
_define(flags.DEFINE_integer, "warmup_steps", 50, "train: linear warm-up steps.")
_define(flags.DEFINE_integer, "lr_decay_steps", None,
        "train: the cosine decay ends here (default --train_steps).")
_define(flags.DEFINE_float, "min_lr_ratio", 0.1, "train: final learning rate / peak.")
_define(flags.DEFINE_float, "weight_decay", 0.1, "train: AdamW decoupled weight decay.")
_define(flags.DEFINE_float, "clip_norm", 1.0,
        "train: clip gradients to this global norm (after the all-reduce); 0: off.")
_define(flags.DEFINE_integer, "grad_accum_steps", 1,
        "train: global batches whose gradients are averaged into one optimizer step.")
_define(flags.DEFINE_float, "dropout", 0.0, "train: dropout rate in the blocks.")
_define(flags.DEFINE_integer, "seed", 0, "train: initialization and data order.")
# Outputs.
_define(flags.DEFINE_string, "output_dir", "runs/gpt",
        "train: checkpoint, TensorBoard logs, loss.png, sample.txt, model.keras, "
        "summary.json. A run given a directory with a checkpoint resumes from it.")
_define(flags.DEFINE_integer, "sample_tokens", 300, "train: tokens to generate at the end.")
_define(flags.DEFINE_string, "sample_prompt", "def ", "train: the sample's prompt.")
_define(flags.DEFINE_float, "temperature", 0.8, "train: sampling temperature.")
_define(flags.DEFINE_integer, "top_k", 40, "train: sample from the k most likely tokens.")
_define(flags.DEFINE_float, "peak_tflops", None,
        "train: peak TFLOP/s per device for MFU (default: the GPU's data sheet, or a "
        "measured matmul on CPUs).")


def config_from_flags(strategy):
    """The TrainConfig the flags describe, for `strategy` (the batch is checked
    against its replicas)."""
    from tfpar.train.job import TrainConfig, TrainConfigError

    if FLAGS["vocab"].present:
        raise TrainConfigError("--vocab: tfpar train takes the vocabulary size from the "
                               "tokenizer (--tokenizer); drop --vocab.")
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"global_batch_size"}
    values = {name: FLAGS[name].value for name in names if name in FLAGS}
    values["model"] = FLAGS.model or "tiny"
    return TrainConfig(**values, global_batch_size=tfpar_flags.global_batch_size(
        strategy, default=DEFAULT_GLOBAL_BATCH))

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
from tfpar.train.config import TrainConfig, TrainConfigError

FLAGS = flags.FLAGS
DEFAULTS = TrainConfig()  # one home for the defaults: the flags show TrainConfig's


def _define(define, name, *args, **kwargs):
    if name not in FLAGS:
        define(name, *args, **kwargs)


# Data.
_define(flags.DEFINE_string, "dataset", DEFAULTS.dataset,
        "train: TFDS dataset of text. Default: the Python standard library's source files "
        "(prepared locally, no download). Others must be prepared in --data_dir.")
_define(flags.DEFINE_string, "data_dir", DEFAULTS.data_dir,
        "train: TFDS data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets).")
_define(flags.DEFINE_string, "text_key", DEFAULTS.text_key,
        "train: the TFDS feature holding the text.")
_define(flags.DEFINE_string, "text_files", DEFAULTS.text_files,
        "train: a glob of local text files to train on instead of --dataset (each file is a "
        "document; 1 window in 20 is held out for validation).")
_define(flags.DEFINE_string, "train_split", DEFAULTS.train_split,
        "train: TFDS split to train on.")
_define(flags.DEFINE_string, "eval_split", DEFAULTS.eval_split,
        "train: TFDS split to evaluate on (if the dataset lacks it, 1 training window in 20 "
        "is held out).")
_define(flags.DEFINE_bool, "download", DEFAULTS.download,
        "train: let TFDS download --dataset if it is not prepared (needs internet).")
_define(flags.DEFINE_string, "tokenizer", DEFAULTS.tokenizer,
        "train: 'bytes' (UTF-8 bytes, 256 ids) or 'package.module:name' of a tokenizer with "
        "vocab_size, encode and decode (see tfpar.data.text.Tokenizer).")
# Optimization.
_define(flags.DEFINE_integer, "train_steps", DEFAULTS.train_steps, "train: optimizer steps in all.")
_define(flags.DEFINE_integer, "eval_every", DEFAULTS.eval_every,
        "train: evaluate and checkpoint every this many optimizer steps.")
_define(flags.DEFINE_integer, "eval_batches", DEFAULTS.eval_batches,
        "train: global batches per evaluation.")
_define(flags.DEFINE_float, "learning_rate", DEFAULTS.learning_rate,
        "train: peak learning rate (AdamW).")
_define(flags.DEFINE_integer, "warmup_steps", DEFAULTS.warmup_steps, "train: linear warm-up steps.")
_define(flags.DEFINE_integer, "lr_decay_steps", DEFAULTS.lr_decay_steps,
        "train: the cosine decay ends here (default --train_steps).")
_define(flags.DEFINE_float, "min_lr_ratio", DEFAULTS.min_lr_ratio,
        "train: final learning rate / peak.")
_define(flags.DEFINE_float, "weight_decay", DEFAULTS.weight_decay,
        "train: AdamW decoupled weight decay.")
_define(flags.DEFINE_float, "clip_norm", DEFAULTS.clip_norm,
        "train: clip gradients to this global norm (after the all-reduce); 0: off.")
_define(flags.DEFINE_integer, "grad_accum_steps", DEFAULTS.grad_accum_steps,
        "train: global batches whose gradients are averaged into one optimizer step.")
_define(flags.DEFINE_float, "dropout", DEFAULTS.dropout, "train: dropout rate in the blocks.")
_define(flags.DEFINE_integer, "seed", DEFAULTS.seed, "train: initialization and data order.")
# Outputs.
_define(flags.DEFINE_string, "output_dir", DEFAULTS.output_dir,
        "train: checkpoint, TensorBoard logs, loss.png, sample.txt, model.keras, "
        "summary.json. A run given a directory with a checkpoint resumes from it.")
_define(flags.DEFINE_integer, "sample_tokens", DEFAULTS.sample_tokens,
        "train: tokens to generate at the end.")
_define(flags.DEFINE_string, "sample_prompt", DEFAULTS.sample_prompt, "train: the sample's prompt.")
_define(flags.DEFINE_float, "temperature", DEFAULTS.temperature, "train: sampling temperature.")
_define(flags.DEFINE_integer, "top_k", DEFAULTS.top_k,
        "train: sample from the k most likely tokens.")
_define(flags.DEFINE_float, "peak_tflops", DEFAULTS.peak_tflops,
        "train: peak TFLOP/s per device for MFU (default: the GPU's data sheet, or a "
        "measured matmul on CPUs).")


_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)
           if f.name not in ("global_batch_size", "model")]
# The flags TrainConfig's rules read; checked together when the flags are
# parsed, so a bad combination fails before TensorFlow starts.
_CHECKED = ["train_steps", "eval_every", "eval_batches", "grad_accum_steps", "warmup_steps",
            "lr_decay_steps", "learning_rate", "min_lr_ratio", "clip_norm", "dropout"]


def _valid(values) -> bool:
    try:
        TrainConfig(**values)
    except TrainConfigError as e:
        raise flags.ValidationError(str(e)) from e
    return True


flags.register_multi_flags_validator(_CHECKED, _valid)


def config_from_flags(strategy) -> TrainConfig:
    """The TrainConfig the flags describe, for `strategy` (the batch is checked
    against its replicas)."""
    if FLAGS["vocab"].present:
        raise TrainConfigError("--vocab: tfpar train takes the vocabulary size from the "
                               "tokenizer (--tokenizer); drop --vocab.")
    values = {name: FLAGS[name].value for name in _FIELDS}
    return TrainConfig(**values, model=FLAGS.model or DEFAULTS.model,
                       global_batch_size=tfpar_flags.global_batch_size(
                           strategy, default=DEFAULTS.global_batch_size))

"""absl flags of `tfpar train`, and the TrainConfig they make.

The strategy flags (`--strategy`, `--dp`, `--tp`, `--pp`,
`--num_simulated_devices`, `--mesh`, `--global_batch_size`, ...) are tfpar's
own (`tfpar.flags`); the model shape flags are `tfpar.models.flags`.
`define_train_flags(fv)` defines all three groups on one FlagValues::

    fv = flags.FlagValues()
    define_train_flags(fv)
    fv(["train", "--dp=2", "--train_steps=200"])
    strategy = tfpar.from_flags(fv)
    tfpar.train.run(config_from_flags(strategy, flag_values=fv), strategy)

No TensorFlow is imported here, so the CLI starts fast.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from tfpar import flags as tfpar_flags
from tfpar import recompute
from tfpar.models import flags as model_flags
from tfpar.train.config import TrainConfig, TrainConfigError

DEFAULTS = TrainConfig()  # one home for the defaults: the flags show TrainConfig's
# Flag name -> (its absl DEFINE function, help); the default is TrainConfig's.
TRAIN_FLAGS = {
    # Data.
    "dataset": (flags.DEFINE_string,
        "TFDS dataset of text. Default: the Python standard library's source files "
        "(prepared locally, no download). Others must be prepared in --data_dir."),
    "data_dir": (flags.DEFINE_string,
        "TFDS data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets)."),
    "text_key": (flags.DEFINE_string, "The TFDS feature holding the text."),
    "text_files": (flags.DEFINE_string,
        "A glob of local text files to train on instead of --dataset (each file is a "
        "document; 1 window in 20 is held out for validation)."),
    "train_split": (flags.DEFINE_string, "TFDS split to train on."),
    "eval_split": (flags.DEFINE_string,
        "TFDS split to evaluate on (if the dataset lacks it, 1 training window in 20 "
        "is held out)."),
    "download": (flags.DEFINE_bool,
        "Let TFDS download --dataset if it is not prepared (needs internet)."),
    "tokenizer": (flags.DEFINE_string,
        "'bpe:VOCAB' (a byte-level BPE trained on the training text at first use and "
        "cached next to the data), 'bytes' (UTF-8 bytes, 256 ids), the path of a saved "
        "tokenizer.json, or 'package.module:name' of a tokenizer with vocab_size, encode and "
        "decode (see tfpar.data.text.Tokenizer)."),
    # Optimization.
    "train_steps": (flags.DEFINE_integer, "Optimizer steps in all."),
    "eval_every": (flags.DEFINE_integer,
        "Evaluate and checkpoint every this many optimizer steps."),
    "eval_batches": (flags.DEFINE_integer, "Global batches per evaluation."),
    "learning_rate": (flags.DEFINE_float, "Peak learning rate (AdamW)."),
    "warmup_steps": (flags.DEFINE_integer, "Linear warm-up steps."),
    "lr_decay_steps": (flags.DEFINE_integer,
        "The cosine decay ends here (default --train_steps)."),
    "min_lr_ratio": (flags.DEFINE_float, "Final learning rate / peak."),
    "weight_decay": (flags.DEFINE_float, "AdamW decoupled weight decay."),
    "clip_norm": (flags.DEFINE_float,
        "Clip gradients to this global norm (after the all-reduce); 0: off."),
    "grad_accum_steps": (flags.DEFINE_integer,
        "Global batches whose gradients are averaged into one optimizer step."),
    "dropout": (flags.DEFINE_float, "Dropout rate in the blocks."),
    "recompute": (tfpar_flags.enum_flag(recompute.MODES),
        "Activation recomputation of each GPT block: none, selective (the attention core) "
        "or full (the whole block): less memory for about 1/3 more compute (full). "
        "keras-hub models (--model=keras_hub:...) take none."),
    "seed": (flags.DEFINE_integer, "Initialization and data order."),
    "deterministic": (flags.DEFINE_bool,
        "TensorFlow's op determinism (tf.config.experimental.enable_op_determinism): a rerun "
        "gives bit-identical weights even where a kernel's summation order may vary between "
        "runs (GPU reductions, scatters, cuDNN; parallel tf.data maps keep their order). "
        "Ops with no deterministic kernel then raise instead of running. Measured on 2 CPU "
        "cores: 0.86x the tokens/s (docs/determinism.md)."),
    # Outputs.
    "output_dir": (flags.DEFINE_string,
        "Checkpoint, TensorBoard logs, loss.png, sample.txt, model.keras, "
        "summary.json. A run given a directory with a checkpoint resumes from it."),
    "async_checkpoint": (flags.DEFINE_bool,
        "Write checkpoints in a background thread: a save stalls training only while the "
        "weights and optimizer state are copied to host memory (which needs room for that "
        "copy); the next save, the end of training and a preemption wait for the write. "
        "--noasync_checkpoint writes each checkpoint before training goes on."),
    "sample_tokens": (flags.DEFINE_integer, "Tokens to generate at the end."),
    "sample_prompt": (flags.DEFINE_string, "The sample's prompt."),
    "temperature": (flags.DEFINE_float, "Sampling temperature."),
    "top_k": (flags.DEFINE_integer, "Sample from the k most likely tokens (0: no limit)."),
    "peak_tflops": (flags.DEFINE_float,
        "Peak TFLOP/s per device for MFU (default: the GPU's data sheet, or a "
        "measured matmul on CPUs)."),
}

_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)
           if f.name not in ("global_batch_size", "model")]
# The flags TrainConfig's rules read; checked together when the flags are
# parsed, so a bad combination fails before TensorFlow starts.
_CHECKED = ["train_steps", "eval_every", "eval_batches", "grad_accum_steps", "warmup_steps",
            "lr_decay_steps", "learning_rate", "min_lr_ratio", "clip_norm", "dropout",
            "recompute", "tokenizer", "temperature", "top_k", "sample_tokens", "model", "layers",
            "hidden", "heads", "seq_len"]


def _valid(values) -> bool:
    try:
        TrainConfig(**{**values, "model": values["model"] or DEFAULTS.model})
    except TrainConfigError as e:
        raise flags.ValidationError(str(e)) from e
    return True


@tfpar_flags.flag_group
def define_train_flags(fv: flags.FlagValues) -> None:
    """The flags of `tfpar train`: its own, the model shape and the strategy flags."""
    model_flags.define_model_flags(fv)
    tfpar_flags.define_strategy_flags(fv)
    for name, (define, help_text) in TRAIN_FLAGS.items():
        define(name, getattr(DEFAULTS, name), help_text, flag_values=fv)
    flags.DEFINE_string("plan", None,
                        "A `tfpar plan --format=json` file: run its recommended layout (sets the "
                        "degree, batch, precision, recomputation and model shape flags; "
                        "tfpar.plan.handoff).", flag_values=fv)
    flags.register_multi_flags_validator(_CHECKED, _valid, flag_values=fv)
    flags.register_validator("vocab", _no_vocab, flag_values=fv)


def _no_vocab(value) -> bool:
    if value is not None:
        raise flags.ValidationError(_VOCAB_GIVEN.format(value=value))
    return True


_VOCAB_GIVEN = ("--vocab={value}: tfpar train takes the vocabulary size from the tokenizer "
                "(--tokenizer); drop --vocab.")


def config_from_flags(strategy, flag_values: flags.FlagValues = flags.FLAGS) -> TrainConfig:
    """The TrainConfig the flags describe, for `strategy` (the batch is checked
    against its replicas)."""
    f = flag_values
    if f["vocab"].value is not None:
        raise TrainConfigError(_VOCAB_GIVEN.format(value=f["vocab"].value))
    values = {name: f[name].value for name in _FIELDS}
    reason = recompute.unsupported_by(strategy, values.get("recompute", "none"))
    if reason:
        raise TrainConfigError(f"--recompute={values['recompute']}: {reason}.")
    return TrainConfig(**values, model=f.model or DEFAULTS.model,
                       global_batch_size=tfpar_flags.global_batch_size(
                           strategy, default=DEFAULTS.global_batch_size, flag_values=f))

"""Text from a trained language model: autoregressive sampling with
temperature, top-k and top-p (nucleus), and the finished run it comes from.

`tfpar train` samples from its model when it ends (sample.txt); `tfpar
generate` loads what that run left in its output dir (model.keras and its
tokenizer) and samples again, through the same `Sampler`. The model is a
plain single-device Keras model, so sampling is the same whatever strategy
trained it (a sharded or staged model gives its weights through
`get_weights`). Example::

    model, tokenizer, spec = load_run("runs/gpt")   # model.keras, tokenizer.json or "bytes"
    text = generate(model, tokenizer, prompt="def ", max_new_tokens=200,
                    temperature=0.8, top_k=40, top_p=0.95, seed=0)

Each new token is drawn from the softmax of the last position's logits
divided by `temperature`, restricted first to the `top_k` most likely tokens
(0: no limit) and then to the smallest set of most likely tokens whose
probability reaches `top_p` (1.0: no limit). Tokens left out get logit -inf
in the vocabulary's own order, so a limit that leaves every token in draws
exactly what unrestricted sampling with the same seed draws. Draws are
stateless: step i of a sample with seed s uses the seed pair (s, i), so a
seed gives the same text on every run.

Speed: there is no KV cache; every token runs the model on the whole window
(at most the model's context, older tokens slide out). The step is one
`tf.function` with a fixed input signature, traced once per `Sampler`, not
once per token or per window length.

TensorFlow loads on first use: the settings (`check_sampling`) and the run
directory (`check_run_dir`, `tokenizer_spec`) are checked when `tfpar
generate`'s flags are parsed, before it starts.
"""

from __future__ import annotations

import json
import os

import numpy as np

# What `tfpar train` leaves in its output dir that sampling reads.
MODEL_FILE = "model.keras"
TOKENIZER_FILE = "tokenizer.json"
SUMMARY_FILE = "summary.json"


class SamplingError(ValueError):
    """Sampling settings out of range, or a run directory that cannot be sampled from."""


# ------------------------------------------------------------------ settings
def check_sampling(temperature: float, top_k: int, top_p: float,
                   max_new_tokens: int = 0) -> None:
    """Raises SamplingError naming the first setting out of range and its rule."""
    if not temperature > 0:  # also refuses NaN
        raise SamplingError(f"temperature={temperature}: must be > 0 (1 samples the model's "
                            "distribution, lower is more conservative; for greedy decoding "
                            "use top_k=1).")
    if top_k < 0:
        raise SamplingError(f"top_k={top_k}: must be >= 0 (the k most likely tokens; 0 "
                            "means no limit, 1 is greedy).")
    if not 0 < top_p <= 1:
        raise SamplingError(f"top_p={top_p}: must be in (0, 1] (the most likely tokens "
                            "whose probability reaches p; 1 means no limit, e.g. 0.95).")
    if max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens={max_new_tokens}: must be >= 0.")


def context_length(model) -> int | None:
    """The longest window `model` takes: its input length, or the `seq_len`
    of its position embedding (tfpar's GPT takes any length up to that)."""
    length = model.input_shape[1]
    for layer in model.layers:
        seq_len = getattr(layer, "seq_len", None)
        if isinstance(seq_len, int):
            length = min(length or seq_len, seq_len)
    return length


# ------------------------------------------------------------------- sampler
class Sampler:
    """Draws tokens from `model` with fixed settings; traced once, used for any
    number of samples and prompts.

    Args:
      model: a Keras model from int32 ids [batch, length] to logits
        [batch, length, model_vocab].
      temperature, top_k, top_p: see the module docstring (`check_sampling`).
      context: the longest window the model sees (default `context_length`).
      vocab_size: draw only ids below this (the tokenizer's vocabulary, when
        the model's is padded past it); default the model's.

    Example::

        sampler = Sampler(model, temperature=0.8, top_k=40, top_p=0.95)
        new_ids = sampler.sample([100, 101, 102, 32], max_new_tokens=50, seed=0)
    """

    def __init__(self, model, temperature: float = 0.8, top_k: int = 40, top_p: float = 1.0,
                 context: int | None = None, vocab_size: int | None = None):
        import tensorflow as tf

        check_sampling(temperature, top_k, top_p)
        model_vocab = int(model.output_shape[-1])
        vocab = min(vocab_size or model_vocab, model_vocab)
        self.context = context or context_length(model)
        temperature, top_p = float(temperature), float(top_p)

        @tf.function(input_signature=[tf.TensorSpec([1, None], tf.int32),
                                      tf.TensorSpec([2], tf.int64)])
        def next_token(window, seed_pair):
            logits = tf.cast(model(window, training=False)[0, -1, :vocab], tf.float32)
            logits = filter_logits(logits / temperature, top_k, top_p)
            return tf.random.stateless_categorical(logits[None], 1, seed=seed_pair,
                                                   dtype=tf.int32)[0, 0]

        self._next_token = next_token
        # Trace, and run once (TensorFlow optimizes the graph at its first run,
        # about 0.3 s on a CPU): now, not inside a timed sample.
        next_token(tf.zeros([1, 1], tf.int32), tf.zeros([2], tf.int64))

    def sample(self, ids, max_new_tokens: int, seed: int = 0) -> list[int]:
        """`max_new_tokens` ids drawn after `ids` (a non-empty sequence of ints)."""
        import tensorflow as tf

        ids = [int(i) for i in ids]
        if not ids:
            raise SamplingError("sample() needs at least one id to start from; encode a "
                                "prompt, or start from a token such as 0.")
        start = len(ids)
        for i in range(max_new_tokens):
            window = tf.constant([ids[-self.context:] if self.context else ids], tf.int32)
            ids.append(int(self._next_token(window, tf.constant([seed, i], tf.int64))))
        return ids[start:]

    @property
    def traces(self) -> int:
        """How many times the step has been traced (1 after any number of samples)."""
        return self._next_token.experimental_get_tracing_count()


def filter_logits(logits, top_k: int, top_p: float):
    """`logits` (one position, [vocab]) with -inf outside the top-k tokens and
    then outside the top-p nucleus; top_k=0 and top_p=1 leave them as they are.

    Ties at a cut-off stay in. Worked example, logits [2, 1, 0, -1] (softmax
    0.64, 0.24, 0.09, 0.03): top_k=3 -> [2, 1, 0, -inf]; then top_p=0.8 keeps
    the tokens whose preceding probability mass is below 0.8 (0, 0.64: the
    first two) -> [2, 1, -inf, -inf].
    """
    import tensorflow as tf

    masked = tf.fill(tf.shape(logits), tf.constant(-np.inf, logits.dtype))
    vocab = int(logits.shape[-1])
    if 0 < top_k < vocab:
        kth = tf.math.top_k(logits, k=top_k).values[-1]
        logits = tf.where(logits < kth, masked, logits)
    if top_p < 1.0:
        ordered = tf.sort(logits, direction="DESCENDING")
        before = tf.cumsum(tf.nn.softmax(ordered), exclusive=True)
        kept = tf.reduce_sum(tf.cast(before < top_p, tf.int32))  # >= 1: before[0] is 0
        logits = tf.where(logits < ordered[kept - 1], masked, logits)
    return logits


def generate(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 40, context: int | None = None, seed: int = 0,
             top_p: float = 1.0) -> str:
    """`prompt` followed by `max_new_tokens` sampled tokens, decoded.

    An empty prompt starts from token 0 (not part of the text). Settings as in
    `Sampler`; for several samples, make one Sampler and call `sample_text`.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    sampler = Sampler(model, temperature, top_k, top_p, context=context,
                      vocab_size=tokenizer.vocab_size)
    return sample_text(sampler, tokenizer, prompt, max_new_tokens, seed)[0]


def sample_text(sampler: Sampler, tokenizer, prompt: str, max_new_tokens: int,
                seed: int = 0) -> tuple[str, int]:
    """(prompt + the sampled continuation, decoded; the number of new tokens)."""
    import tensorflow as tf

    ids = [int(i) for i in np.asarray(tokenizer.encode(tf.constant(prompt)))]
    new = sampler.sample(ids or [0], max_new_tokens, seed)
    return tokenizer.decode(ids + new), len(new)


# -------------------------------------------------------------- a run's files
def check_run_dir(output_dir: str) -> None:
    """Raises SamplingError unless `output_dir` holds a model `tfpar train` saved."""
    run = f"run `tfpar train --output_dir={output_dir}` first"
    if not os.path.isdir(output_dir):
        raise SamplingError(f"--output_dir={output_dir!r}: no such directory; {run}, or give "
                            "the output dir of a finished run.")
    if not os.path.isfile(os.path.join(output_dir, MODEL_FILE)):
        raise SamplingError(f"--output_dir={output_dir!r} has no {MODEL_FILE} (tfpar train "
                            f"writes it when training ends); {run} (it resumes an unfinished "
                            "run).")


def tokenizer_spec(output_dir: str, override: str | None = None) -> str:
    """The tokenizer a run's model reads, as a `tfpar.data.text.load_tokenizer`
    spec: `override` if given, else the run's tokenizer.json, else the
    "tokenizer" of its summary.json ("bytes", "module:attr").

    Raises SamplingError for what cannot be loaded without training: a BPE
    spec ("bpe:V") without its tokenizer.json, or a tokenizer.json that is
    not there.
    """
    if override:
        spec = override
    elif os.path.isfile(os.path.join(output_dir, TOKENIZER_FILE)):
        return os.path.join(output_dir, TOKENIZER_FILE)
    else:
        summary = _read_summary(output_dir)
        spec = summary.get("tokenizer") if summary else None
        if not isinstance(spec, str) or not spec:
            raise SamplingError(f"--output_dir={output_dir!r} has no {TOKENIZER_FILE} and no "
                                f"{SUMMARY_FILE} naming the tokenizer; give --tokenizer=bytes, "
                                "--tokenizer=PATH/tokenizer.json or --tokenizer=module:name.")
    from tfpar.data import bpe

    if spec.startswith(bpe.PREFIX):
        given = (f"--tokenizer={spec!r}" if override else
                 f"--output_dir={output_dir!r}: its {SUMMARY_FILE} names {spec!r}")
        raise SamplingError(f"{given}, a BPE trained on a run's text, and there is no "
                            f"{output_dir}/{TOKENIZER_FILE}; give "
                            "--tokenizer=PATH/tokenizer.json (tfpar train caches it under "
                            "<data_dir>/tfpar_tokenizers/).")
    if spec.endswith(".json") and not os.path.isfile(spec):
        raise SamplingError(f"--tokenizer={spec!r}: no such file; give the path of a saved "
                            "tokenizer.json (a tfpar train output dir has one).")
    return spec


def _read_summary(output_dir: str) -> dict | None:
    try:
        with open(os.path.join(output_dir, SUMMARY_FILE)) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def load_run(output_dir: str, tokenizer: str | None = None):
    """(model, tokenizer, tokenizer spec) of a finished `tfpar train` run.

    `tokenizer` overrides the run's (see `tokenizer_spec`). Raises
    SamplingError (or `tfpar.data.text.TextDataError`, a ValueError, for a
    tokenizer that does not load) naming the file and the fix.
    """
    import keras

    import tfpar.models.transformer  # noqa: F401 - registers the GPT's layers for loading
    from tfpar.data.text import load_tokenizer

    check_run_dir(output_dir)
    spec = tokenizer_spec(output_dir, tokenizer)
    loaded = load_tokenizer(spec)
    path = os.path.join(output_dir, MODEL_FILE)
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - Keras raises many types for a bad archive
        raise SamplingError(f"{path}: not a Keras model this tfpar can load "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); run "
                            f"`tfpar train --output_dir={output_dir}` again.") from None
    model_vocab = int(model.output_shape[-1])
    if loaded.vocab_size > model_vocab:
        raise SamplingError(f"tokenizer {spec!r} has {loaded.vocab_size} ids but the model in "
                            f"{path} only {model_vocab}; give the tokenizer the run trained "
                            "with (--tokenizer).")
    return model, loaded, spec

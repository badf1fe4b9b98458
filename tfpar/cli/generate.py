"""`tfpar generate`: text from the model a `tfpar train` run saved (`tfpar.train.sample`).

    $ tfpar train --output_dir=runs/gpt --train_steps=200
    $ tfpar generate --output_dir=runs/gpt --prompt=def --max_new_tokens=200 --top_p=0.95
    def ...
    tfpar generate: 200 tokens in 0.6 s (330 tokens/s), model 137,216 parameters, tokenizer bytes

The text goes to stdout (one sample after another, each after a `=== sample
i/N (seed S) ===` line when --num_samples > 1), the speed line to stderr.
Sample j uses seed --seed + j, so `--seed=3` alone gives the fourth sample of
`--seed=0 --num_samples=4`. With the defaults, and --max_new_tokens equal to
the run's --sample_tokens, it is the run's sample.txt again.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

from tfpar.cli.flags import Command, write_error
from tfpar.flags import define_flags, flag_group
from tfpar.train import sample

GENERATE_FLAGS = {
    "output_dir": (flags.DEFINE_string, "runs/gpt",
                   "The output dir of a finished tfpar train run: its model.keras, and its "
                   "tokenizer.json or the tokenizer its summary.json names."),
    "prompt": (flags.DEFINE_string, "def", "The text to continue."),
    "max_new_tokens": (flags.DEFINE_integer, 200, "Tokens to generate after the prompt."),
    "temperature": (flags.DEFINE_float, 0.8,
                    "Divides the logits: 1 samples the model's distribution, lower is more "
                    "conservative."),
    "top_k": (flags.DEFINE_integer, 40,
              "Sample from the k most likely tokens; 0: no limit, 1: greedy."),
    "top_p": (flags.DEFINE_float, 1.0,
              "Nucleus sampling: from the most likely tokens whose probability reaches p "
              "(after --top_k), e.g. 0.95; 1: no limit."),
    "seed": (flags.DEFINE_integer, 0, "Seed of the first sample (the same seed, the same text)."),
    "num_samples": (flags.DEFINE_integer, 1,
                    "Samples to draw, with seeds --seed, --seed + 1, ..."),
    "tokenizer": (flags.DEFINE_string, None,
                  "Override the run's tokenizer: 'bytes', the path of a tokenizer.json, or "
                  "'package.module:name' (see tfpar train --help)."),
}


@flag_group
def define_generate_flags(fv: flags.FlagValues) -> None:
    define_flags(fv, GENERATE_FLAGS)
    # Checked when parsed, so a bad value fails before TensorFlow starts; one
    # validator, so a command line gets one error (the first) and not one per flag.
    flags.register_multi_flags_validator(_CHECKED, _valid, flag_values=fv)


_CHECKED = ["temperature", "top_k", "top_p", "max_new_tokens", "num_samples", "output_dir",
            "tokenizer"]


def _valid(f) -> bool:
    for name in ("max_new_tokens", "num_samples"):
        if f[name] < 1:
            raise flags.ValidationError(f"--{name}={f[name]}: must be >= 1.")
    try:
        sample.check_sampling(f["temperature"], f["top_k"], f["top_p"])
    except sample.SamplingError as e:
        raise flags.ValidationError(f"--{e}") from None
    try:
        sample.check_run_dir(f["output_dir"])
        sample.tokenizer_spec(f["output_dir"], f["tokenizer"])
    except sample.SamplingError as e:  # these name their flag already
        raise flags.ValidationError(str(e)) from None
    return True


def run(fv, program) -> int:
    from tfpar.data.text import TextDataError

    try:
        model, tokenizer, spec = sample.load_run(fv.output_dir, fv.tokenizer)
        sampler = sample.Sampler(model, fv.temperature, fv.top_k, fv.top_p,
                                 vocab_size=tokenizer.vocab_size)
    except (sample.SamplingError, TextDataError) as e:
        write_error("generate", str(e))
        return 2
    tokens, seconds = 0, 0.0
    try:
        for j in range(fv.num_samples):
            if fv.num_samples > 1:
                print(f"=== sample {j + 1}/{fv.num_samples} (seed {fv.seed + j}) ===")
            start = time.perf_counter()
            text, new = sample.sample_text(sampler, tokenizer, fv.prompt, fv.max_new_tokens,
                                           seed=fv.seed + j)
            seconds += time.perf_counter() - start
            tokens += new
            print(text, flush=True)
    except BrokenPipeError:  # the reader stopped (`| head`): done, as other tools are
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    name = getattr(tokenizer, "name", spec)
    sys.stderr.write(f"tfpar generate: {tokens} tokens in {seconds:.1f} s "
                     f"({tokens / max(seconds, 1e-9):,.0f} tokens/s), model "
                     f"{model.count_params():,} parameters, tokenizer {name}\n")
    return 0


COMMAND = Command(
    name="generate",
    summary="sample text from the model a tfpar train run saved",
    usage="[--output_dir DIR] [--prompt TEXT] [--max_new_tokens N] [--temperature T] "
          "[--top_k K] [--top_p P] [--seed S] [--num_samples N] [--tokenizer SPEC]",
    example='tfpar generate --output_dir=runs/gpt --prompt=def --max_new_tokens=200 '
            "--top_p=0.95",
    groups=(("generate", define_generate_flags),),
    run=run,
    uses_tensorflow=True,
)

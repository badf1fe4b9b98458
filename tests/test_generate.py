"""`tfpar generate` and its sampler: temperature, top-k and top-p, from a saved run.

A run directory here is what `tfpar train` leaves for sampling, made in a
moment: an untrained one-layer GPT saved as model.keras, with a summary.json
naming the tokenizer (or a tokenizer.json). An untrained model's
distribution is close to uniform, so a wrong filter or seed shows as a
different draw.
"""

import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from conftest import tfpar_cli
from tfpar.cli.main import main as cli_main
from tfpar.data import bpe
from tfpar.data.text import ByteTokenizer
from tfpar.train import sample

SHAPE = tfpar.models.GPTConfig(layers=1, hidden=32, heads=2, vocab=256, seq_len=16)
PROMPT = "def "


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    keras_model = tfpar.models.gpt(SHAPE)
    # Spread the logits (an untrained head is almost uniform: near-ties would
    # make "greedy" fragile) to a standard deviation of about 2.4: the most
    # likely tokens stand out and dozens still have a chance.
    kernel = keras_model.get_layer("lm_head").kernel
    kernel.assign(kernel * 5.0)
    return keras_model


@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    model.save(out / sample.MODEL_FILE)
    (out / sample.SUMMARY_FILE).write_text(json.dumps({"tokenizer": "bytes"}))
    return out


def ids_of(text):
    return list(text.encode())


_SAMPLERS = {}  # (settings) -> (model, its Sampler): one trace per model and settings


def sampler_for(model, **settings):
    settings = {"temperature": 1.0, "top_k": 0, "top_p": 1.0} | settings
    key = tuple(sorted(settings.items()))
    for known, sampler in _SAMPLERS.get(key, []):
        if known is model:
            return sampler
    sampler = sample.Sampler(model, **settings)
    _SAMPLERS.setdefault(key, []).append((model, sampler))
    return sampler


def draw(model, seed=0, tokens=12, prompt=PROMPT, **settings):
    return sampler_for(model, **settings).sample(ids_of(prompt), tokens, seed=seed)


def greedy(model, prompt, tokens):
    """The argmax continuation, from the model's logits (window: its seq_len)."""
    ids = ids_of(prompt)
    for _ in range(tokens):
        logits = model(np.asarray([ids[-SHAPE.seq_len:]], np.int32))[0, -1]
        ids.append(int(np.argmax(logits)))
    return ids[len(ids_of(prompt)):]


# ------------------------------------------------------------------ sampler
def test_the_same_seed_gives_the_same_tokens_and_another_seed_others(model):
    first = draw(model, seed=3, top_k=40, top_p=0.95)
    assert draw(model, seed=3, top_k=40, top_p=0.95) == first
    assert draw(model, seed=4, top_k=40, top_p=0.95) != first


def test_top_k_1_is_the_greedy_argmax_continuation(model):
    # 20 tokens: past the 16-token context, so the window slides too.
    assert draw(model, tokens=20, top_k=1, temperature=0.7) == greedy(model, PROMPT, 20)


def test_a_tiny_top_p_is_greedy(model):
    assert draw(model, tokens=20, top_p=1e-6) == greedy(model, PROMPT, 20)


def test_top_p_1_and_top_k_vocab_draw_what_unrestricted_sampling_draws(model):
    unrestricted = draw(model, seed=7, tokens=20, temperature=3.0)
    assert draw(model, seed=7, tokens=20, temperature=3.0, top_k=SHAPE.vocab,
                top_p=1.0) == unrestricted
    assert draw(model, seed=7, tokens=20, temperature=3.0, top_k=5) != unrestricted


def test_filter_logits_keeps_the_top_k_then_the_top_p_nucleus():
    logits = tf.constant([1.0, 2.0, -1.0, 0.0])  # softmax 0.24, 0.64, 0.03, 0.09
    kept = lambda top_k, top_p: np.isfinite(sample.filter_logits(logits, top_k, top_p)).tolist()
    assert kept(3, 1.0) == [True, True, False, True]
    assert kept(0, 0.8) == [True, True, False, False]   # 0.64 < 0.8: the second one is in
    assert kept(0, 0.6) == [False, True, False, False]
    assert kept(0, 0.95) == [True, True, False, True]   # 0.64 + 0.24 < 0.95
    assert kept(0, 1.0) == [True] * 4


def test_only_the_tokenizers_ids_are_drawn_from_a_padded_vocabulary(model):
    drawn = sample.Sampler(model, temperature=5.0, top_k=0, vocab_size=20).sample([1], 60)
    assert max(drawn) < 20 and len(set(drawn)) > 8


def test_the_step_is_traced_once_for_any_window_and_sample(model):
    sampler = sampler_for(model, top_k=40, top_p=0.95)
    for seed, prompt in enumerate(["d", "def main():"]):
        sampler.sample(ids_of(prompt), 20, seed=seed)  # windows of 1 to 16 tokens
    assert sampler.traces == 1


def test_generate_returns_the_prompt_and_the_tokens_decoded(model):
    text = sample.generate(model, ByteTokenizer(), PROMPT, 10, top_k=1)
    assert text.startswith("def ")
    assert text == ByteTokenizer().decode(ids_of(PROMPT) + greedy(model, PROMPT, 10))


@pytest.mark.parametrize("settings, named", [
    ({"temperature": 0.0}, "temperature=0.0: must be > 0"),
    ({"top_k": -1}, "top_k=-1: must be >= 0"),
    ({"top_p": 0.0}, "top_p=0.0: must be in (0, 1]"),
    ({"top_p": 1.01}, "top_p=1.01: must be in (0, 1]"),
])
def test_settings_out_of_range_name_the_value_and_the_rule(model, settings, named):
    with pytest.raises(sample.SamplingError, match=re.escape(named)):
        sample.generate(model, ByteTokenizer(), PROMPT, 5, **{"temperature": 1.0} | settings)


# ----------------------------------------------------------- the run's files
def test_a_run_dir_loads_the_saved_model_and_the_summarys_tokenizer(model, run_dir):
    loaded, tokenizer, spec = sample.load_run(str(run_dir))
    assert spec == "bytes" and isinstance(tokenizer, ByteTokenizer)
    assert draw(loaded, seed=3, top_k=40, top_p=0.95) == draw(model, seed=3, top_k=40,
                                                              top_p=0.95)


def test_the_cli_writes_the_samples_and_the_speed(run_dir, model, capsys):
    code = cli_main(["tfpar", "generate", f"--output_dir={run_dir}", "--prompt=def ",
                     "--max_new_tokens=8", "--top_k=1", "--num_samples=2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    expected = ByteTokenizer().decode(ids_of(PROMPT) + greedy(model, PROMPT, 8))
    assert out == (f"=== sample 1/2 (seed 0) ===\n{expected}\n"
                   f"=== sample 2/2 (seed 1) ===\n{expected}\n")
    assert re.fullmatch(r"tfpar generate: 16 tokens in \d+\.\d s \([\d,]+ tokens/s\), model "
                        f"{SHAPE.num_parameters:,} parameters, tokenizer bytes\n", err), err


@pytest.fixture(scope="module")
def bpe_run_dir(tmp_path_factory):
    """A run of a BPE of up to 300 ids (fewer: the text has fewer pairs to merge)
    with its tokenizer.json and a summary naming bpe:300; the model's
    vocabulary is padded to 384, as tfpar train pads it."""
    out = tmp_path_factory.mktemp("bpe_run")
    text = "def main():\n    return sum(x * x for x in range(10))\n" * 50
    bpe.trained(300, lambda: iter([text]), str(out / sample.TOKENIZER_FILE))
    keras_model = tfpar.models.gpt(tfpar.models.GPTConfig(layers=1, hidden=32, heads=2,
                                                          vocab=384, seq_len=16))
    keras_model.save(out / sample.MODEL_FILE)
    (out / sample.SUMMARY_FILE).write_text(json.dumps({"tokenizer": "bpe:300"}))
    return out


def test_a_run_with_a_tokenizer_json_samples_with_it(bpe_run_dir, capsys):
    code = cli_main(["tfpar", "generate", f"--output_dir={bpe_run_dir}", "--prompt=def main",
                     "--max_new_tokens=20", "--temperature=3", "--top_k=0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    model, tokenizer, _ = sample.load_run(str(bpe_run_dir))
    assert 256 < tokenizer.vocab_size <= 300
    assert err.rstrip().endswith(f"tokenizer bpe:{tokenizer.vocab_size}"), err
    assert out == sample.generate(model, tokenizer, "def main", 20, temperature=3,
                                  top_k=0) + "\n"


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(bpe_run_dir, run_dir):
    with pytest.raises(sample.SamplingError, match="has 2[6-9][0-9] ids but the model in .* "
                                                   "only 256; give the tokenizer the run"):
        sample.load_run(str(run_dir), tokenizer=str(bpe_run_dir / sample.TOKENIZER_FILE))


# ------------------------------------------------------------ a real process
@pytest.mark.multiprocess
def test_tfpar_generate_prints_the_prompt_continued_and_the_tokens_per_second(run_dir):
    result = tfpar_cli("generate", f"--output_dir={run_dir}", "--prompt=def ",
                       "--max_new_tokens=30", "--top_p=0.9", check=True, timeout=120)
    assert result.stdout.startswith("def "), result.stdout
    assert re.search(r"^tfpar generate: 30 tokens in \d+\.\d s \([\d,]+ tokens/s\), model "
                     r"[\d,]+ parameters, tokenizer bytes$", result.stdout, re.M), result.stdout
    assert "Traceback" not in result.stdout

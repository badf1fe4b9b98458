"""Benchmark: one Keras GPT script, Keras's distribution API on JAX vs tfpar on TensorFlow.

The script (`train` below) sets a `keras.distribution` (none, `DataParallel`,
`ModelParallel` on a 2x2 mesh), builds tfpar's reference GPT, compiles and
fits; it never names a backend. It runs twice, each half in a subprocess of
its own, one after the other on the same cores:

- JAX: `KERAS_BACKEND=jax`, `XLA_FLAGS=--xla_force_host_platform_device_count=4`
  (Keras's own implementation of the distribution API);
- TensorFlow: `KERAS_BACKEND=tensorflow`, 4 simulated CPU devices and
  `tfpar.enable_keras_distribution()` (the distribution becomes a tfpar
  `TensorParallel`: a DTensor program on the same mesh).

It prints tokens/s for each of the 6 cells and the tfpar/JAX ratio per
distribution, as a table and as JSON.

Usage::

    python bench/keras_peer.py [--layers 4 --hidden 256 --seq_len 128 --batch 32]
                               [--steps 8] [--rounds 2] [--jax_python /tmp/jaxenv/bin/python]

JAX is not a tfpar dependency. Install it for the bench only:
`pip install "jax[cpu]"` (it leaves keras, numpy and tensorflow as they are:
check with `pip install --dry-run` first), or into a venv that sees the
system packages (`python -m venv --system-site-packages /tmp/jaxenv &&
/tmp/jaxenv/bin/pip install "jax[cpu]"`) and pass `--jax_python`. Without
JAX the bench says so and reports the TensorFlow half only.

Simulated CPU devices share the machine's cores on both backends, so the
figures compare the two implementations' overheads, never a speed-up.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICES = 4
CELLS = ("one_device", "data_parallel", "model_parallel_2x2")


def distribution(cell):
    """The Keras distribution of a cell: the same code on both backends."""
    import keras

    if cell == "one_device":
        return None
    devices = keras.distribution.list_devices()[:DEVICES]
    if cell == "data_parallel":
        return keras.distribution.DataParallel(devices=devices)
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices=devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*mlp_up/kernel"] = (None, "model")
    layout_map[".*mlp_down/kernel"] = ("model", None)
    layout_map[".*(query|key|value)/kernel"] = (None, "model", None)
    layout_map[".*attention_output/kernel"] = ("model", None, None)
    layout_map[".*token_embedding/embeddings"] = ("model", None)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


def train(cell, shape, batch, steps, warmup):
    """The user's script: set a distribution, build, compile, fit. Returns tokens/s."""
    import keras
    import numpy as np

    import tfpar

    keras.distribution.set_distribution(distribution(cell))
    try:
        keras.utils.set_random_seed(0)
        model = tfpar.models.gpt(shape)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=tfpar.models.lm_loss())
        rng = np.random.RandomState(0)
        tokens = rng.randint(0, shape.vocab, size=(batch * (warmup + steps), shape.seq_len + 1))
        x, y = tokens[:, :-1].astype("int32"), tokens[:, 1:].astype("int32")
        # The warm-up traces and compiles the step; the timed fit reuses it.
        model.fit(x[:batch * warmup], y[:batch * warmup], batch_size=batch, verbose=0)
        start = time.perf_counter()
        model.fit(x[batch * warmup:], y[batch * warmup:], batch_size=batch, verbose=0)
        elapsed = time.perf_counter() - start
        return {"tokens_per_s": steps * batch * shape.seq_len / elapsed,
                "step_s": elapsed / steps, "jit_compile": bool(model.jit_compile)}
    finally:
        keras.distribution.set_distribution(None)


def run_half(args):
    """Inside a subprocess: the backend is fixed by KERAS_BACKEND."""
    import tfpar

    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        tfpar.simulate_devices(DEVICES)
        tfpar.enable_keras_distribution()
    shape = tfpar.models.GPTConfig(layers=args.layers, hidden=args.hidden, heads=args.heads,
                                   seq_len=args.seq_len)
    results = {"backend": backend, "keras": keras.__version__, "cells": {}}
    if backend == "jax":
        import jax

        results["jax"] = jax.__version__
    else:
        import tensorflow as tf

        results["tensorflow"] = tf.__version__
    for cell in CELLS:
        results["cells"][cell] = train(cell, shape, args.batch, args.steps, args.warmup)
        print(f"{backend} {cell}: {results['cells'][cell]['tokens_per_s']:.0f} tokens/s",
              file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(results), flush=True)


def has_jax(python):
    try:
        return subprocess.run([python, "-c", "import jax"], capture_output=True,
                              timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def launch_half(backend, python, args):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                          if p))
    if backend == "jax":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={DEVICES}").strip()
    command = [python, __file__, "--half", backend] + [
        f"--{k}={getattr(args, k)}" for k in ("layers", "hidden", "heads", "seq_len", "batch",
                                              "steps", "warmup")]
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"the {backend} half failed (exit {result.returncode}); its output "
                         f"is above.\n{result.stdout[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def best(kept, new):
    """`new`, with each cell replaced by `kept`'s where that one was faster."""
    if kept is not None:
        for cell, result in kept["cells"].items():
            if result["tokens_per_s"] > new["cells"][cell]["tokens_per_s"]:
                new["cells"][cell] = result
    return new


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per cell")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating JAX/TensorFlow rounds; each cell keeps its best")
    parser.add_argument("--jax_python", default=sys.executable,
                        help="the Python that has jax[cpu] (default: this one)")
    parser.add_argument("--half", choices=("jax", "tensorflow"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.half:
        return run_half(args)

    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "shape": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "seq_len",
                                                      "batch", "steps", "rounds")}}
    jax_ok = has_jax(args.jax_python)
    if not jax_ok:
        print(f"JAX is missing: `{args.jax_python} -c 'import jax'` fails. Install it for the "
              "bench (pip install 'jax[cpu]', or a venv and --jax_python); reporting the "
              "TensorFlow half only.", file=sys.stderr)
    # Halves alternate round by round, and each cell keeps its best round, so that
    # other load on the machine does not fall on one backend only.
    report["jax"], report["tfpar"] = None, None
    for _ in range(args.rounds):
        if jax_ok:
            report["jax"] = best(report["jax"], launch_half("jax", args.jax_python, args))
        report["tfpar"] = best(report["tfpar"], launch_half("tensorflow", sys.executable, args))

    print(f"\n{'cell':<22}{'JAX tokens/s':>14}{'tfpar tokens/s':>16}{'tfpar/JAX':>11}")
    for cell in CELLS:
        ours = report["tfpar"]["cells"][cell]["tokens_per_s"]
        theirs = report["jax"]["cells"][cell]["tokens_per_s"] if report["jax"] else None
        ratio = ours / theirs if theirs else None
        report.setdefault("ratios", {})[cell] = ratio
        print(f"{cell:<22}{theirs or float('nan'):>14.0f}{ours:>16.0f}"
              f"{ratio or float('nan'):>11.2f}")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""From a plan to a run: the `tfpar train` flags of a plan's recommendation.

`tfpar plan --format=json > plan.json` writes, under "recommended", the
layout it chose as `dims` (`ParallelDims.describe()`) and `train_flags`: the
flags that make `tfpar train` run it (the degrees and micro-batches, the
global batch and accumulation, precision, recomputation, the model shape).
`tfpar train --plan=plan.json` applies them; the plan and the runtime speak
one vocabulary (`ParallelDims.flags()`), so a layout the plan marks runnable
is the layout that runs::

    tfpar plan --model=mini --devices=8 --global_batch_size=32 --format=json > plan.json
    tfpar train --plan=plan.json --num_simulated_devices=8 --train_steps=200

A flag given on the command line that says something else than the plan is
an error (which one wins would be a guess); flags the plan does not set
(steps, data, output) are the command line's. The vocabulary is not taken
from the plan: `tfpar train` takes it from its tokenizer.
"""

from __future__ import annotations

import json

from absl import flags

from tfpar.parallel_dims import ParallelDims

# The model shape flags a plan sets (the vocabulary comes from the tokenizer).
SHAPE_FLAGS = ("layers", "hidden", "heads", "seq_len")


class PlanFileError(ValueError):
    """A plan file that `tfpar train` cannot run; the message says why and what to do."""


def train_flags(candidate, work) -> list[str] | None:
    """The `tfpar train` flags that run `candidate` (a `search.Candidate`) on
    `work` (the plan's `Workload`), or None when tfpar cannot run it."""
    if candidate.tfpar_flags is None:
        return None
    model = work.model
    out = candidate.tfpar_flags.split()
    if candidate.dims.world_size == 1:
        out.insert(0, "--strategy=one_device")  # else "auto" would take every local device
    out += [f"--precision={work.precision}", f"--recompute={work.recompute}"]
    if "--reduce_dtype" not in candidate.tfpar_flags:
        out.append("--reduce_dtype=float32")
    out += [f"--{name}={getattr(model, name)}" for name in SHAPE_FLAGS]
    return out


def load(path: str) -> tuple[list[str], ParallelDims]:
    """The recommended layout's train flags and degrees, from a `tfpar plan --format=json` file."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise PlanFileError(f"--plan={path}: no such file; write one with "
                            "`tfpar plan ... --format=json > plan.json`.") from None
    except json.JSONDecodeError as e:
        raise PlanFileError(f"--plan={path}: not JSON ({e}); write it with "
                            "`tfpar plan ... --format=json > plan.json`.") from None
    if not isinstance(doc, dict) or "recommended" not in doc:
        raise PlanFileError(f"--plan={path}: not the output of `tfpar plan --format=json` "
                            "(no \"recommended\" entry).")
    best = doc["recommended"]
    if best is None:
        reasons = "; ".join(doc.get("reasons") or []) or "nothing fits"
        raise PlanFileError(f"--plan={path}: the plan recommends no layout ({reasons}).")
    if best.get("train_flags") is None:
        raise PlanFileError(
            f"--plan={path}: tfpar cannot run the recommended layout "
            f"({_degrees(best['dims'])}: {best.get('reasons', [''])[-1]}); make a plan "
            "of layouts it runs with `tfpar plan ... --runnable_only --format=json`.")
    model = doc.get("model", {})
    if model.get("mlp_ratio", 4) != 4:
        raise PlanFileError(f"--plan={path}: the planned model has an MLP ratio of "
                            f"{model['mlp_ratio']}; tfpar train's GPT has 4.")
    return list(best["train_flags"]), ParallelDims.from_dict(best["dims"])


def apply(fv: flags.FlagValues, path: str) -> ParallelDims:
    """Sets the plan's flags on `fv` (a parsed `tfpar train` FlagValues).

    Raises PlanFileError when a flag given on the command line contradicts
    the plan. Returns the plan's degrees.
    """
    planned, dims = load(path)
    given = {}
    for item in planned:
        name, _, text = item[2:].partition("=")
        flag = fv[name]
        value = flag.parser.parse(text)
        if flag.present and flag.value != value:
            given[name] = (flag.value, text)
        elif not flag.present:
            setattr(fv, name, value)  # runs the flag's validators
    if given:
        clash = ", ".join(f"--{n}={v!s} (the plan: --{n}={p})" for n, (v, p) in given.items())
        raise PlanFileError(f"--plan={path} sets flags the command line also gives: {clash}; "
                            "drop them from the command line, or plan again with those values.")
    # Degrees the plan leaves at 1 have no flag: one given on the command line
    # (--dp=2, --strategy=...) would change the layout without a clash above.
    from tfpar.flags import dims_from_flags

    if dims_from_flags(fv) != dims:
        raise PlanFileError(
            f"--plan={path} runs {dims} ({' '.join(dims.flags()) or 'one device'}), but the "
            f"command line makes it {dims_from_flags(fv)}; drop the degree and --strategy "
            "flags from the command line.")
    return dims


def _degrees(dims: dict) -> str:
    return ", ".join(f"{k}={dims[k]}" for k in ("dp", "fsdp", "tp", "pp") if dims.get(k, 1) > 1) \
        or "one device"

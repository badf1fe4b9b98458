"""`tfpar plan --format=json` -> `tfpar train --plan=plan.json` (tfpar.plan.handoff).

The plan's "runs in tfpar" flags and `tfpar train`'s degree flags are one
vocabulary: every candidate a plan marks runnable parses, through tfpar
train's own flags, into the candidate's `ParallelDims`, which this release
can run. The end-to-end run (plan -> train of a pipeline of tensor-parallel
stages) is in tests/test_train.py.
"""

import json

import pytest

from tfpar.cli.train import COMMAND as TRAIN
from tfpar.flags import dims_from_flags
from tfpar.models import SIZES, GPTConfig
from tfpar.parallel_dims import ParallelDims
from tfpar.plan import Hardware, Workload, handoff, recommend
from tfpar.plan.render import as_json
from tfpar.plan.search import tfpar_flags

NODE = {"devices_per_node": 8, "memory_gib": 80}
PLANS = {
    # small models on one node: replicated, sharded, tensor, pipeline, 3-D layouts
    "mini on 8": (Workload(SIZES["mini"], 32, precision="float32"), Hardware(devices=8, **NODE)),
    "mini on 8, little memory": (
        Workload(SIZES["mini"], 8, precision="float32"),
        Hardware(devices=8, devices_per_node=8, memory_gib=0.005)),
    "gpt2-xl on 8, zbv": (Workload(SIZES["gpt2-xl"], 64, schedule="zbv", recompute="full"),
                          Hardware(devices=8, **NODE)),
    "gpt3-13b on 64, interleaved": (
        Workload(SIZES["gpt3-13b"], 256, schedule="interleaved_1f1b", recompute="full"),
        Hardware(devices=64, **NODE)),
    "gpt3-175b on 1024": (Workload(SIZES["gpt3-175b"], 1536, recompute="full"),
                          Hardware(devices=1024, **NODE)),
}


def parse_train(args):
    fv = TRAIN.flag_values()
    fv(["tfpar train", *args])
    return fv


@pytest.mark.parametrize("name", sorted(PLANS))
def test_every_candidate_marked_runnable_parses_into_its_degrees_through_tfpar_train(name):
    plan = recommend(*PLANS[name])
    runnable = [c for c in plan.candidates if c.tfpar_flags]
    assert runnable, name
    kinds, four_d = set(), 0
    for c in plan.candidates:
        if c.tfpar_flags is None:
            # Not runnable: tensor-parallel or sharded stages of a pipeline wider
            # than a host (or degrees the release refuses).
            assert c.dims.unsupported() or (
                c.dims.pp > 1 and (c.dims.tp > 1 or c.dims.fsdp > 1)
                and c.dims.world_size > plan.hardware.devices_per_node), c.dims
            continue
        flags = handoff.train_flags(c, plan.work)
        dims = dims_from_flags(parse_train(flags))
        assert dims == c.dims, (c.tfpar_flags, dims)
        kinds.add(dims.strategy_kind())
        four_d += dims.pp > 1 and dims.fsdp > 1
    print(name, sorted(kinds), f"{len(runnable)} of {len(plan.candidates)} runnable, "
          f"{four_d} with sharded pipeline stages")
    if name.startswith("mini on 8"):
        assert four_d, name  # pp x fsdp layouts are priced and run


def test_the_plan_json_gives_tfpar_train_its_layout_and_model(tmp_path):
    plan = recommend(*PLANS["mini on 8, little memory"])
    doc = as_json(plan)
    best = doc["recommended"]
    assert (best["tensor"], best["pipeline"]) == (4, 2)  # a pipeline of tensor-parallel stages
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    fv = parse_train([f"--plan={path}", "--train_steps=30", "--eval_every=10"])
    dims = handoff.apply(fv, str(path))
    assert dims == ParallelDims.from_dict(best["dims"]) == dims_from_flags(fv)
    assert (fv.tp, fv.pp, fv.microbatches, fv.global_batch_size) == (4, 2, 8, 8)
    mini = SIZES["mini"]
    assert (fv.layers, fv.hidden, fv.heads, fv.seq_len) == (
        mini.layers, mini.hidden, mini.heads, mini.seq_len)
    assert fv.train_steps == 30 and fv.precision == "float32"

    # The same value on the command line is no clash.
    handoff.apply(parse_train([f"--plan={path}", "--tp=4", "--seq_len=128"]), str(path))


def write_plan(tmp_path, name):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(as_json(recommend(*PLANS[name]))))
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["--tp=2"], r"--tp=2 \(the plan: --tp=4\).*drop them from the command line"),
    (["--global_batch_size=16", "--layers=2"],
     r"--global_batch_size=16 \(the plan: --global_batch_size=8\), --layers=2 \(the plan: "),
    (["--dp=2"], r"runs pp 2 x tp 4 \(--tp=4 --pp=2 --microbatches=8 --schedule=1f1b\), but "
                 r"the command line makes it pp 2 x dp 2 x tp 4; drop the degree and --strategy"),
])
def test_a_command_line_that_contradicts_the_plan_is_refused(tmp_path, args, message):
    path = write_plan(tmp_path, "mini on 8, little memory")
    with pytest.raises(handoff.PlanFileError, match=message):
        handoff.apply(parse_train([f"--plan={path}", *args]), path)


def test_the_published_175b_and_1t_layouts_are_runnable_in_shape(tmp_path):
    """Megatron-LM's GPT-3 175B (1024 GPUs) and 1T (3072 GPUs) layouts, one process
    per node of 8: every process runs one stage's tensor-parallel mesh of 8 GPUs,
    R processes hold each stage as data-parallel replicas. Only the device count
    keeps them from running here."""
    path = write_plan(tmp_path, "gpt3-175b on 1024")
    _, dims = handoff.load(path)
    assert (dims.dp, dims.tp, dims.pp) == (16, 8, 8)
    assert dims.process_stages(1024 // 8) == (16, 1)  # 16 processes per stage, 1 x 8 GPUs each
    fv = parse_train([f"--plan={path}"])
    assert handoff.apply(fv, path) == dims == dims_from_flags(fv)
    one_t = ParallelDims(dp=6, tp=8, pp=64, microbatches=64)  # Narayanan et al. (2021), Table 1
    assert one_t.process_stages(3072 // 8) == (6, 1)
    assert tfpar_flags(one_t, 1, 64, Hardware(devices=3072, **NODE)) == (
        "--dp=6 --tp=8 --pp=64 --microbatches=64 --schedule=1f1b --global_batch_size=384")


def test_a_plan_tfpar_cannot_run_or_that_is_not_a_plan_is_refused(tmp_path):
    # 175B on 1024 GPUs with a split backward: its tensor-parallel stages run in
    # their own processes, as one compiled function, which a split backward cannot split.
    work = Workload(SIZES["gpt3-175b"], 1536, recompute="full", schedule="zb_h1")
    path = tmp_path / "zb.json"
    path.write_text(json.dumps(as_json(recommend(work, Hardware(devices=1024, **NODE)))))
    with pytest.raises(handoff.PlanFileError,
                       match=r"cannot run the recommended layout \(dp=16, tp=4, pp=16: "
                             r".*--runnable_only"):
        handoff.load(str(path))
    nothing = as_json(recommend(Workload(SIZES["gpt3-175b"], 8), Hardware(devices=8, **NODE)))
    (tmp_path / "none.json").write_text(json.dumps(nothing))
    with pytest.raises(handoff.PlanFileError, match=r"recommends no layout \(nothing fits"):
        handoff.load(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(handoff.PlanFileError, match=r"bad.json: not JSON.*tfpar plan"):
        handoff.load(str(tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(handoff.PlanFileError, match=r"no \"recommended\" entry"):
        handoff.load(str(tmp_path / "other.json"))
    with pytest.raises(handoff.PlanFileError, match=r"missing.json: no such file"):
        handoff.load(str(tmp_path / "missing.json"))


def test_a_plan_for_one_device_runs_on_one_device(tmp_path):
    work = Workload(GPTConfig(layers=2, hidden=64, heads=4, vocab=256, seq_len=64), 8,
                    precision="float32")
    plan = recommend(work, Hardware(devices=1, devices_per_node=1, memory_gib=80))
    flags = handoff.train_flags(plan.best, work)
    assert flags[0] == "--strategy=one_device"
    assert dims_from_flags(parse_train(flags)) == ParallelDims()

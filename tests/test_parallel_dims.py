"""ParallelDims: the degrees, their product, the mesh order, and the errors (pure Python)."""

import re

import pytest

from tfpar.parallel_dims import ParallelDims, ParallelDimsError


def test_world_size_is_the_product_and_the_batch_splits_over_data_and_sharded_data():
    dims = ParallelDims(dp=2, fsdp=4, tp=8, pp=3)
    assert dims.world_size == 192 and dims.batch_shards == 8
    assert (dims.dp_enabled, dims.fsdp_enabled, dims.tp_enabled, dims.pp_enabled) == (
        True, True, True, True)
    assert not ParallelDims().tp_enabled and ParallelDims().world_size == 1


def test_mesh_axes_run_outermost_pipeline_then_data_sharded_data_tensor():
    dims = ParallelDims(dp=2, fsdp=4, tp=8, pp=3)
    assert list(dims.mesh_shape().items()) == [("pipeline", 3), ("batch", 2), ("fsdp", 4),
                                               ("model", 8)]
    assert ParallelDims(dp=2, tp=2).mesh_spec() == "batch:2,model:2"
    assert ParallelDims(tp=4).mesh_spec() == "batch:1,model:4"
    assert ParallelDims(dp=3).mesh_spec() == "batch:3,model:1"


@pytest.mark.parametrize("spec, dims", [
    ("batch:2,model:2", ParallelDims(dp=2, tp=2)),
    ("batch:1,model:4", ParallelDims(tp=4)),
    ("model:2,batch:4", ParallelDims(dp=4, tp=2)),
    ("pipeline:2,batch:2,model:2", ParallelDims(pp=2, dp=2, tp=2)),
])
def test_a_mesh_spec_reads_as_degrees(spec, dims):
    assert ParallelDims.from_mesh(spec) == dims


def test_a_mesh_axis_tfpar_does_not_know_is_refused_with_the_known_ones():
    with pytest.raises(ParallelDimsError, match=r"mesh axes \['data'\].*'batch'"):
        ParallelDims.from_mesh("data:2,model:2")


def test_the_product_must_equal_the_devices_and_the_error_names_every_degree_and_a_fix():
    with pytest.raises(ParallelDimsError) as e:
        ParallelDims(dp=2, tp=2).validate(8)
    message = str(e.value)
    for part in ("pipeline 1", "data 2", "sharded data 1", "tensor 2", "= 4 devices",
                 "has 8", "--dp=4"):
        assert part in message, message
    assert ParallelDims(dp=2, tp=4).validate(8).world_size == 8


@pytest.mark.parametrize("kwargs, message", [
    ({"dp": 0}, "dp=0: every parallel degree is a whole number >= 1"),
    ({"tp": 1.5}, "tp=1.5"),
    ({"pp": True}, "pp=True"),
    ({"schedule": "zigzag"}, "schedule='zigzag': use one of"),
    ({"pp": 4, "schedule": "1f1b", "virtual_stages": 2},
     "virtual_stages=2: schedule '1f1b' runs 1 stage(s) per device; use "
     "schedule='interleaved_1f1b'"),
    ({"pp": 4, "schedule": "zbv", "virtual_stages": 3}, "schedule 'zbv' runs 2 stage(s)"),
    ({"pp": 4, "microbatches": 6, "schedule": "interleaved_1f1b"},
     "divides by 4 (it sends them in rounds of one per device), got 6; use e.g. "
     "microbatches=8"),
])
def test_bad_degrees_are_refused_naming_the_value_and_the_rule(kwargs, message):
    with pytest.raises(ParallelDimsError, match=re.escape(message)):
        ParallelDims(**kwargs)


@pytest.mark.parametrize("dims, kind", [
    (ParallelDims(), "one_device"), (ParallelDims(dp=4), "data"),
    (ParallelDims(dp=2, tp=2), "tensor"), (ParallelDims(pp=2, dp=2), "pipeline"),
    (ParallelDims(fsdp=4), "sharded"), (ParallelDims(fsdp=2, tp=2, zero_stage=1), "sharded"),
    (ParallelDims(pp=2, tp=2, dp=2), "pipeline"), (ParallelDims(pp=2, fsdp=2, tp=2), "pipeline"),
])
def test_each_runnable_combination_has_one_strategy(dims, kind):
    assert dims.strategy_kind() == kind
    assert ParallelDims(dp=4).strategy_kind(multi_process=True) == "multi_worker"


@pytest.mark.parametrize("dims, message", [
    (ParallelDims(fsdp=2, pp=2, zero_stage=1), "not with zero_stage=1"),
])
def test_degrees_this_release_cannot_run_are_refused_saying_so(dims, message):
    assert message in dims.unsupported()
    with pytest.raises(ParallelDimsError, match=message):
        dims.strategy_kind()


def test_flags_and_dicts_round_trip():
    dims = ParallelDims(pp=4, dp=2, microbatches=8, schedule="gpipe")
    assert dims.flags() == ["--dp=2", "--pp=4", "--microbatches=8", "--schedule=gpipe"]
    assert ParallelDims(tp=8).flags() == ["--tp=8"]
    assert ParallelDims.from_dict(dims.describe()) == dims
    with pytest.raises(ParallelDimsError, match="world_size=3 does not match"):
        ParallelDims.from_dict({"dp": 2, "world_size": 3})
    with pytest.raises(ParallelDimsError, match=r"unknown parallel degree\(s\) \['cp'\]"):
        ParallelDims.from_dict({"dp": 2, "cp": 2})
    assert str(dims) == "pp 4 x dp 2" and str(ParallelDims()) == "one device"


def test_virtual_stages_default_to_the_schedules_and_round_trip():
    assert ParallelDims(pp=4, microbatches=8, schedule="zbv").virtual_stages == 2
    assert ParallelDims(pp=4, microbatches=8, schedule="zb_h1").virtual_stages == 1
    dims = ParallelDims(pp=4, microbatches=8, schedule="interleaved_1f1b", virtual_stages=3)
    assert dims.flags() == ["--pp=4", "--microbatches=8", "--schedule=interleaved_1f1b",
                            "--virtual_stages=3"]
    assert ParallelDims.from_dict(dims.describe()) == dims
    assert dims.describe()["virtual_stages"] == 3

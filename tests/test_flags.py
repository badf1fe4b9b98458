"""The absl flags: each bad combination is refused at parse time with its own reason."""

import json

import pytest
from absl import flags
from absl.testing import flagsaver

import tfpar
from tfpar import flags as tfpar_flags
from tfpar.train import flags as train_flags
from tfpar.cluster import ClusterConfigError
from tfpar.parallel_dims import ParallelDimsError

FLAGS = flags.FLAGS
train_flags.define_train_flags(FLAGS)  # the strategy flags are defined by tfpar.flags


@pytest.fixture(autouse=True)
def fresh_flags():
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        yield
    FLAGS.unparse_flags()


def parse(*argv):
    FLAGS(["prog", *argv])


@pytest.mark.parametrize("argv, message", [
    (["--mesh=batch:2,model"], "is not 'axis:size'"),
    (["--mesh=model:4"], "needs a 'batch' axis"),
    (["--mesh=batch:2,batch:2"], "appears twice"),
    (["--layouts=zigzag"], "--layouts=zigzag: use 'megatron' or 'replicated'"),
    (["--strategy=pipeline", "--microbatches=0"], "--microbatches=0: must be >= 1"),
    (["--strategy=pipeline", "--pipeline_stages=3", "--split_points=block_1"],
     "--pipeline_stages=3 but --split_points=block_1 make 2 stages"),
    (["--strategy=pipeline", "--split_points=a,a"], "names a layer twice"),
    (["--strategy=data", "--microbatches=4"], "configure the pipeline, but --strategy=data"),
    (["--strategy=pipeline", "--pipeline_stages=4", "--num_simulated_devices=2"],
     "--num_simulated_devices=2 is fewer than the 4 devices"),
    (["--strategy=pipeline", "--schedule=zigzag"], "value should be one of"),
    (["--strategy=pipeline", "--schedule=1f1b", "--virtual_stages=2"],
     "--schedule=1f1b --virtual_stages=2: schedule '1f1b' runs 1 stage(s) per device"),
    (["--pp=4", "--schedule=interleaved_1f1b", "--microbatches=6"],
     "--schedule=interleaved_1f1b --microbatches=6: schedule 'interleaved_1f1b' with 4 "
     "devices needs a number of micro-batches that divides by 4"),
    (["--strategy=data", "--virtual_stages=2"], "configure the pipeline, but --strategy=data"),
    (["--train_steps=50", "--eval_every=20"], "not a multiple of --eval_every=20"),
    (["--grad_accum_steps=0"], "--grad_accum_steps=0: must be >= 1"),
    (["--model=gpt5"], "--model=gpt5: use one of"),
    (["--global_batch_size=64", "--per_replica_batch_size=16"], "were both given; give one"),
    (["--global_batch_size=0"], "--global_batch_size=0: must be > 0"),
    (["--num_simulated_devices=-1"], "--num_simulated_devices=-1: must be >= 0"),
    (["--heartbeat_timeout=0"], "--heartbeat_timeout=0.0: must be > 0 seconds"),
    (["--register_timeout=0"], "--register_timeout=0.0: must be > 0 seconds"),
    (["--collective_timeout=-5"], "--collective_timeout=-5.0: must be >= 0"),
    (["--pack_bytes=-1"], "--pack_bytes=-1: must be >= 0"),
    (["--task_index=1"], "--task_index=1 was given without --worker_hosts"),
    (["--chief_host=c:1"], "--chief_host was given without --worker_hosts"),
    (["--worker_hosts=a:1,b:1", "--task_index=2"], "task index 2 is out of range"),
    (["--worker_hosts=a:1,a:1"], "used twice"),
    (["--worker_hosts=a"], "has no port"),
    (["--worker_hosts=a:1", "--strategy=data"], "but --strategy=data trains on one host"),
    (["--strategy=multi_worker", "--all_reduce=hierarchical_copy"], "is for --strategy=data"),
    (["--strategy=data", "--all_reduce=ring"], "--all_reduce=ring is a multi-worker all-reduce"),
    (["--strategy=bogus"], "value should be one of"),
    (["--precision=float16"], "value should be one of"),
])
def test_bad_flags_are_refused_at_parse_time(argv, message):
    with pytest.raises(flags.IllegalFlagValueError) as e:
        parse(*argv)
    assert message in str(e.value)


def test_auto_picks_data_parallel_on_several_local_devices():
    parse("--num_simulated_devices=4")
    strategy = tfpar.from_flags()
    assert isinstance(strategy, tfpar.DataParallel)
    assert strategy.num_replicas_in_sync == 4


def test_auto_picks_multi_worker_when_a_cluster_is_configured(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
         "task": {"type": "worker", "index": 1}}))
    parse()
    assert tfpar_flags.resolve_strategy_name() == "multi_worker"
    assert tfpar_flags.cluster_from_flags().rank == 1


def test_a_pipeline_across_processes_needs_its_share_of_devices_in_each(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
         "task": {"type": "worker", "index": 1}}))
    parse("--pp=2", "--dp=2", "--num_simulated_devices=2")  # 4 devices over 2 processes
    assert tfpar_flags.resolve_strategy_name() == "pipeline"
    assert tfpar_flags.dims_from_flags() == tfpar.ParallelDims(pp=2, dp=2)
    FLAGS.unparse_flags()
    with pytest.raises(flags.IllegalFlagValueError,
                       match="fewer than the 4 devices the pipeline needs .stages x replicas. "
                             "over 2 processes; use --num_simulated_devices=2"):
        parse("--pp=2", "--dp=2", "--num_simulated_devices=1")
    FLAGS.unparse_flags()
    parse("--strategy=pipeline", "--num_simulated_devices=2")  # a stage per device of the job
    assert tfpar_flags.dims_from_flags().pp == 4


@pytest.mark.parametrize("dims", [tfpar.ParallelDims(pp=4, tp=2),
                                  tfpar.ParallelDims(pp=3, fsdp=2)])
def test_mesh_stages_across_processes_need_one_stage_per_process(dims):
    cluster = tfpar.cluster.Cluster.from_hosts(["127.0.0.1:1", "127.0.0.1:2"])
    with pytest.raises(ParallelDimsError, match=r"put one pipeline stage in each process, "
                                                r"or one data-parallel replica of it, so pp "
                                                r"must divide the 2 processes"):
        tfpar.strategies.build(dims, cluster=cluster, kind="pipeline")


def test_one_device_flag_builds_one_device():
    parse("--strategy=one_device")
    strategy = tfpar.from_flags()
    assert isinstance(strategy, tfpar.OneDevice) and strategy.num_replicas_in_sync == 1


def test_worker_hosts_and_tf_config_together_are_refused(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}}))
    parse("--worker_hosts=127.0.0.1:5,127.0.0.1:6")
    with pytest.raises(ClusterConfigError, match="both TF_CONFIG and --worker_hosts"):
        tfpar_flags.cluster_from_flags()


def test_multi_worker_without_a_cluster_says_how_to_get_one():
    parse("--strategy=multi_worker")
    with pytest.raises(ClusterConfigError, match="tfpar launch"):
        tfpar.from_flags()


def test_malformed_tf_config_fails_from_flags_instead_of_training_alone(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker"')
    parse()
    with pytest.raises(ClusterConfigError, match="not valid JSON"):
        tfpar.from_flags()


@pytest.mark.parametrize("argv, expected", [
    (["--global_batch_size=64"], 64),
    (["--per_replica_batch_size=16"], 64),
    ([], 32),
])
def test_batch_flags_have_global_and_per_replica_semantics(argv, expected):
    parse(*argv)
    strategy = tfpar.DataParallel()
    assert tfpar_flags.global_batch_size(strategy, default=32) == expected


def test_global_batch_that_does_not_split_over_replicas_is_refused():
    parse("--global_batch_size=30")
    with pytest.raises(ValueError, match="does not split evenly over 4 replicas; use a multiple of 4, e.g. 28 or 32"):
        tfpar_flags.global_batch_size(tfpar.DataParallel())

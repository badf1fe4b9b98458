"""The command line: each command its own flags and --help; the degree flags and their shorthands."""

import re

import pytest
from absl import flags

import tfpar
from tfpar import flags as tfpar_flags
from tfpar.cli.main import main
from tfpar.parallel_dims import ParallelDims

from conftest import NUM_DEVICES, tfpar_cli

HELP = {
    "plan": (["plan"], "--devices_per_node", "--nproc"),
    "k8s render": (["k8s", "render"], "--kind", "--devices_per_node"),
    "launch": (["launch"], "--nproc", "--devices_per_node"),
    "train": (["train"], "--train_steps", "--nproc"),
    "info": (["info"], "--json", "--image"),
    "generate": (["generate"], "--top_p", "--train_steps"),
}


def cli(capsys, *args):
    code = main(["tfpar", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", list(HELP))
@pytest.mark.parametrize("help_flag", ["--help", "-h", "--helpfull"])
def test_help_lists_the_commands_own_flags_and_not_another_commands(capsys, command, help_flag):
    words, own, foreign = HELP[command]
    code, out, _ = cli(capsys, *words, help_flag)
    assert code == 0
    assert out.startswith(f"tfpar {command}: ") and f"usage: tfpar {command} " in out
    assert "example:\n  tfpar " + command in out
    assert f"  {own}  (default: " in out and "  --verbosity  (default: -1)" in out
    assert f"  {foreign}  " not in out


@pytest.mark.parametrize("command, flag, owner", [
    (["train"], "--nproc=2", "'tfpar launch'"),
    (["plan"], "--kind=jobset", "'tfpar k8s render'"),
    (["launch"], "--devices_per_node=4", "'tfpar plan'"),
    (["k8s", "render"], "--train_steps=5", "'tfpar train'"),
    (["info"], "--grace_period=5", "'tfpar launch' and 'tfpar k8s render'"),
])
def test_a_flag_of_another_command_names_the_command_it_belongs_to(capsys, command, flag, owner):
    code, out, err = cli(capsys, *command, flag, "--", "python", "t.py")
    name = " ".join(command)
    assert code == 2 and out == ""
    assert err == (f"tfpar {name}: {flag.split('=')[0]} is a flag of {owner}, not of "
                   f"'tfpar {name}'; see tfpar {name} --help\n")


def test_an_unknown_flag_is_absls_message_with_the_help_hint(capsys):
    code, _, err = cli(capsys, "plan", "--devics=8")
    assert code == 2
    assert err.startswith("tfpar plan: Unknown command line flag 'devics'")
    assert err.rstrip().endswith("see tfpar plan --help") and "Traceback" not in err


@pytest.mark.parametrize("args, code", [([], 2), (["--help"], 0)])
def test_tfpar_alone_lists_the_commands(capsys, args, code):
    got, out, err = cli(capsys, *args)
    assert got == code
    listing = out if code == 0 else err
    assert re.search(r"^  k8s render +Kubernetes manifests", listing, re.M)
    assert re.search(r"^  generate +sample text from the model a tfpar train run saved",
                     listing, re.M)
    assert "`tfpar <command> --help` lists the command's flags" in listing


def test_k8s_and_launch_each_show_their_own_restart_defaults(capsys):
    _, k8s_help, _ = cli(capsys, "k8s", "render", "--help")
    _, launch_help, _ = cli(capsys, "launch", "--help")
    assert "--grace_period  (default: 120)" in k8s_help
    assert "--max_restarts  (default: 3)" in k8s_help
    assert "--grace_period  (default: 10)" in launch_help
    assert "--max_restarts  (default: 0)" in launch_help


def test_k8s_render_kind_picks_the_manifests_and_the_help_after_dashes_is_the_programs(capsys):
    code, out, err = cli(capsys, "k8s", "render", "--name=mnist", "--image=img:1",
                         "--workers=2", "--kind=tfjob", "--", "python", "t.py", "--help")
    assert code == 0, err
    assert "kind: TFJob" in out and "- --help" in out
    code, _, err = cli(capsys, "k8s", "render", "--name=mnist", "--image=img:1",
                       "--workers=2", "--kind=helm", "--", "python", "t.py")
    assert code == 2 and "--kind='helm': use one of ['indexed-job', 'jobset', 'tfjob']" in err


def test_plan_keeps_format_table_or_json(capsys):
    code, _, err = cli(capsys, "plan", "--format=yaml")
    assert code == 2 and "--format=yaml: value should be one of <table|json>" in err


# ------------------------------------------------------------ degree flags
def parsed(*argv):
    fv = flags.FlagValues()
    tfpar_flags.define_strategy_flags(fv)
    fv(["prog", *argv])
    return fv


@pytest.mark.parametrize("shorthand, degrees", [
    (["--strategy=tensor", "--mesh=batch:2,model:2"], ["--dp=2", "--tp=2"]),
    (["--strategy=pipeline", "--pipeline_stages=4", "--pipeline_replicas=2", "--microbatches=8"],
     ["--pp=4", "--dp=2", "--microbatches=8"]),
    (["--strategy=pipeline", "--split_points=block_1,block_2", "--schedule=gpipe"],
     ["--pp=3", "--schedule=gpipe"]),
    (["--strategy=data"], [f"--dp={NUM_DEVICES}"]),
    (["--strategy=one_device"], ["--dp=1"]),
])
def test_a_shorthand_gives_the_same_dims_as_the_degree_flags(shorthand, degrees):
    assert tfpar_flags.dims_from_flags(parsed(*shorthand)) == \
        tfpar_flags.dims_from_flags(parsed(*degrees))


def test_degree_flags_give_their_parallel_dims():
    assert tfpar_flags.dims_from_flags(parsed("--dp=2", "--tp=2")) == ParallelDims(dp=2, tp=2)
    assert tfpar_flags.dims_from_flags(parsed("--pp=4", "--dp=2", "--microbatches=8")) == \
        ParallelDims(pp=4, dp=2, microbatches=8)


@pytest.mark.parametrize("argv, message", [
    (["--strategy=data", "--tp=2"],
     "--strategy=data and --tp=2 disagree: --strategy=data means --tp=1"),
    (["--mesh=batch:2,model:2", "--tp=4"],
     "--mesh=batch:2,model:2 and --tp=4 disagree: --mesh=batch:2,model:2 means --tp=2"),
    (["--strategy=pipeline", "--pipeline_stages=4", "--pp=2"],
     "--pipeline_stages=4 and --pp=2 disagree"),
    (["--strategy=pipeline", "--pipeline_replicas=2", "--dp=4"],
     "--pipeline_replicas=2 and --dp=4 disagree"),
    (["--pp=4", "--split_points=block_2"], "--split_points=block_2 and --pp=4 disagree: "
                                           "--split_points=block_2 means --pp=2"),
    (["--strategy=tensor", "--pp=2"], "--strategy=tensor and --pp=2 disagree"),
    (["--tp=0"], "--tp=0: a parallel degree is a whole number >= 1"),
])
def test_degree_flags_that_disagree_with_a_shorthand_are_refused_naming_both(argv, message):
    with pytest.raises(flags.IllegalFlagValueError, match=re.escape(message)):
        parsed(*argv)


@pytest.mark.parametrize("argv, reason", [
    (["--fsdp=2", "--pp=2", "--dp=2"], "a pipeline shards its stages at ZeRO stage 3 over "
                                       "every data device of a stage (fsdp), not with dp=2 x "
                                       "fsdp=2"),
])
def test_degrees_this_release_cannot_run_are_refused_at_parse_time(argv, reason):
    with pytest.raises(flags.IllegalFlagValueError, match=re.escape(reason)):
        parsed(*argv)


def test_pipeline_flags_need_a_pipeline_which_pp_gives():
    with pytest.raises(flags.IllegalFlagValueError, match="configure the pipeline"):
        parsed("--microbatches=4")
    assert tfpar_flags.dims_from_flags(parsed("--pp=2", "--microbatches=4")).microbatches == 4


def test_from_flags_builds_tensor_parallel_from_degree_flags():
    # The process has its NUM_DEVICES simulated CPUs (conftest); TensorFlow
    # can split them only once, so the flags ask for the same count.
    strategy = tfpar.from_flags(parsed("--dp=2", "--tp=2", f"--num_simulated_devices={NUM_DEVICES}"))
    assert isinstance(strategy, tfpar.TensorParallel)
    assert strategy.dims == ParallelDims(dp=2, tp=2)


def test_degrees_the_devices_cannot_hold_are_a_parallel_dims_error():
    with pytest.raises(tfpar.parallel_dims.ParallelDimsError, match="but the job has 4"):
        tfpar.from_flags(parsed("--dp=8"))


@pytest.mark.multiprocess
def test_train_reports_a_parallel_dims_error_as_a_usage_error():
    result = tfpar_cli("train", "--dp=8", "--num_simulated_devices=4", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stdout
    assert result.stdout.startswith("tfpar train: ") and "but the job has 4" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout


# ----------------------------------------------------------------- logging
@pytest.mark.multiprocess
def test_info_prints_no_tensorflow_or_absl_log_lines_by_default():
    result = tfpar_cli("info", "--strategy=data", "--num_simulated_devices=2",
                       env={"TF_CPP_MIN_LOG_LEVEL": ""}, timeout=120)
    assert result.returncode == 0, result.stdout
    assert "dims:     pp 1 x dp 2 x fsdp 1 x tp 1 = 2 device(s)" in result.stdout
    assert not re.findall(r"^[IW]\d{4} .*$", result.stdout, re.M), result.stdout

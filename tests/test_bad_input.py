"""Bad input: every value a user gives, malformed, is refused in one line.

One table holds every case: TF_CONFIG, the flags of every command, mesh
strings, LayoutMaps, split points, `ParallelDims`, Kubernetes names, sizes and
images, plan hardware, text and TFDS paths, tokenizer specs, corrupt and
foreign checkpoints. A command-line case must give:

- exactly one line on stderr, `tfpar <command>: ...`, naming the bad value
  and saying what to do instead, and no traceback;
- exit code 2 (a usage error), or 1 where the command ran and failed by
  design (`tfpar plan` when nothing fits);
- nothing on stdout (unless the command documents output for that case);
- nothing written or deleted: the files under its temporary directory (its
  working directory, output, checkpoint and TFDS data dirs) keep their names,
  sizes and modification times.

Command lines run in this process through `tfpar.cli.main.main` (as the
console script does, without its `sys.exit`). A case marked `at_parse` must be
refused while the flags are parsed: before the command runs and before
TensorFlow is imported. Cases marked `fresh` (checkpoints, which need a
training job's TensorFlow) run as a real `tfpar` process.

A library case calls the API and expects its documented error (a ValueError
subclass) with a message that names the value and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

import keras
import pytest

import tfpar
from conftest import REPO
from tfpar.cli import main as cli_main
from tfpar.cluster import Cluster, ClusterConfigError
from tfpar.data.corpus import prepare
from tfpar.data.text import TextDataError, file_documents, load_tokenizer
from tfpar.k8s import JobSpec, K8sSpecError, render
from tfpar.parallel_dims import ParallelDims, ParallelDimsError
from tfpar.plan.cost import Hardware
from tfpar.strategies.pipeline import PipelineConfigError, PipelineSplitError, split
from tfpar.strategies.tensor.layouts import LayoutError
from tfpar.strategies.tensor.mesh import MeshError, parse_mesh

# ------------------------------------------------------------------ the cases
GOOD_TF_CONFIG = {"cluster": {"worker": ["w0:2222", "w1:2222"]},
                  "task": {"type": "worker", "index": 0}}


def tf_config(**changes) -> str:
    config = json.loads(json.dumps(GOOD_TF_CONFIG))
    config.update(changes)
    return json.dumps(config)


@dataclasses.dataclass(frozen=True)
class Cli:
    """`tfpar ARGS` (with {tmp} the case's temporary directory), under ENV.

    value: what the one stderr line must quote; fix: what it must say to do.
    at_parse: refused while parsing, before the command runs or TensorFlow
    starts. setup(tmp): files the case starts from (which must survive).
    fresh: run as a `tfpar` process. stdout: the command may print its
    documented output. without: modules the case runs as if not installed.
    """

    args: str
    value: str
    fix: str
    code: int = 2
    env: dict = dataclasses.field(default_factory=dict)
    at_parse: bool = True
    setup: Callable[[Path], None] | None = None
    fresh: bool = False
    stdout: bool = False
    without: tuple[str, ...] = ()

    @property
    def command(self) -> str:
        words = shlex.split(self.args)
        if words[0] == "k8s":
            return "k8s render" if words[1:2] == ["render"] else "k8s"
        return words[0] if words[0] in cli_main._BY_NAME else ""


@dataclasses.dataclass(frozen=True)
class Lib:
    """`call()` raises `error` whose message contains `value` and `fix`."""

    call: Callable[[], object]
    error: type
    value: str
    fix: str


# Checkpoints a `tfpar train --output_dir` may find.
def _backup(tmp, metadata: str, weights: bool = True, state: dict | str | None = None):
    out = tmp / "out"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "training_metadata.json").write_text(metadata)
    if weights:
        (out / "checkpoint" / "backup-e1-b0.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    if state is not None:
        (out / "train_state.json").write_text(
            state if isinstance(state, str) else json.dumps(state))


_METADATA = json.dumps({"epoch": 1, "step_in_epoch": 0, "weights": "backup-e1-b0.weights.h5"})
# The settings of a `tfpar train` run with the defaults, but 12 layers.
_OTHER_MODEL = {"settings": {"model_config": {"layers": 12, "hidden": 768},
                             "global_batch_size": 32, "grad_accum_steps": 1, "eval_every": 100,
                             "seed": 0},
                "initial_val_loss": 5.0, "train_losses": [], "val_losses": [],
                "tokens": 0.0, "seconds": 0.0}


# A `tfpar train` output dir as `tfpar generate` finds it (the model is only
# read after the flags and the tokenizer are checked).
def _run_dir(tmp, summary: dict | None = None, tokenizer_json: str | None = None):
    out = tmp / "out"
    out.mkdir()
    (out / "model.keras").write_bytes(b"PK\x03\x04 not a Keras archive")
    if summary is not None:
        (out / "summary.json").write_text(json.dumps(summary))
    if tokenizer_json is not None:
        (out / "tokenizer.json").write_text(tokenizer_json)


GENERATE = "generate --output_dir={tmp}/out"
K8S = "k8s render --name=lm --image=img:1 --workers=2"
PLAN = "plan --model=gpt2-small --devices=8 --global_batch_size=64"

CLI_CASES = {
    # ------------------------------------------------------ commands
    "unknown command": Cli("trian --dp=2", "'trian'", "tfpar --help"),
    "k8s without render": Cli("k8s rendr --name=x", "'rendr'", "tfpar k8s render"),
    "flag of another command": Cli("train --nproc=2", "--nproc", "'tfpar launch'"),
    "unknown flag": Cli("plan --devics=8", "devics", "tfpar plan --help"),
    "stray argument": Cli("plan --devices=8 extra", "extra", "takes flags only"),
    "program after -- to train": Cli("train -- python x.py", "python x.py", "runs no program"),
    # ------------------------------------------------------ TF_CONFIG
    "tf_config not json": Cli("info", "{cluster", "Write it as",
                              env={"TF_CONFIG": "{cluster: worker}"}),
    "tf_config a list": Cli("info", "['w0:2222']", "JSON object",
                            env={"TF_CONFIG": '["w0:2222"]'}),
    "tf_config no task": Cli("info", "None", '"task": {"type": "worker"',
                             env={"TF_CONFIG": json.dumps({"cluster": {"worker": ["w0:1"]}})}),
    "tf_config task without index": Cli("info", "{'type': 'worker'}", "'index'",
                                        env={"TF_CONFIG": tf_config(task={"type": "worker"})}),
    "tf_config index out of range": Cli(
        "info", "task index 5", "indices 0..1",
        env={"TF_CONFIG": tf_config(task={"type": "worker", "index": 5})}),
    "tf_config index not a number": Cli(
        "info", "'one'", "integer",
        env={"TF_CONFIG": tf_config(task={"type": "worker", "index": "one"})}),
    "tf_config duplicate hosts": Cli(
        "info", "'w0:2222'", "its own host:port",
        env={"TF_CONFIG": tf_config(cluster={"worker": ["w0:2222", "w0:2222"]})}),
    "tf_config bad port": Cli(
        "info", "'w1:99999'", "1..65535",
        env={"TF_CONFIG": tf_config(cluster={"worker": ["w0:2222", "w1:99999"]})}),
    "tf_config no port": Cli(
        "info", "'w1'", "'host:port'",
        env={"TF_CONFIG": tf_config(cluster={"worker": ["w0:2222", "w1"]})}),
    "tf_config unknown role": Cli(
        "info", "'trainer'", "'worker'",
        env={"TF_CONFIG": tf_config(cluster={"trainer": ["w0:2222"]})}),
    "tf_config misspelled key": Cli(
        "train", "'clusters'", "misspelling",
        env={"TF_CONFIG": json.dumps({"clusters": {}, "task": {}})}),
    "tf_config two chiefs": Cli(
        "info", "2 'chief' tasks", "'worker' tasks",
        env={"TF_CONFIG": tf_config(cluster={"chief": ["c0:1", "c1:1"], "worker": ["w0:1"]})}),
    "tf_config and worker_hosts": Cli(
        "info --worker_hosts=a:1,b:1", "--worker_hosts", "unset TF_CONFIG",
        env={"TF_CONFIG": tf_config()}),
    # ------------------------------------------------------ strategy flags
    "dp not a number": Cli("train --dp=two", "'two'", "int"),
    "dp zero": Cli("train --dp=0", "--dp=0", ">= 1"),
    "tp negative": Cli("info --tp=-2", "--tp=-2", ">= 1"),
    "hsdp below stage 3": Cli("train --fsdp=2 --dp=2 --zero_stage=2", "dp=2 x fsdp=2",
                              "--zero_stage=3"),
    "hsdp with recompute": Cli("train --fsdp=2 --dp=2 --recompute=full --num_simulated_devices=4",
                               "--recompute=full", "--recompute=none", at_parse=False),
    "fsdp x pp below stage 3": Cli("info --fsdp=2 --pp=2 --zero_stage=1", "zero_stage=1",
                                   "--zero_stage=3"),
    "zero stage unknown": Cli("train --fsdp=2 --zero_stage=4", "--zero_stage=4", "2 (+ gradients)"),
    "zero stage without fsdp": Cli("info --zero_stage=2", "--zero_stage=2", "add --fsdp=N"),
    "reduce dtype with tp": Cli("train --tp=2 --reduce_dtype=bfloat16", "--reduce_dtype=bfloat16",
                                "use --dp"),
    "reduce dtype unknown": Cli("train --dp=2 --reduce_dtype=int8", "--reduce_dtype=int8",
                                "bfloat16"),
    "strategy unknown": Cli("train --strategy=zero3", "--strategy=zero3", "one of <auto|"),
    "precision unknown": Cli("train --precision=fp8", "--precision=fp8", "mixed_bfloat16"),
    "schedule unknown": Cli("train --pp=2 --schedule=zigzag", "--schedule=zigzag", "1f1b"),
    "mesh without sizes": Cli("train --strategy=tensor --mesh=batch2", "'batch2'", "'axis:size"),
    "mesh size zero": Cli("train --strategy=tensor --mesh=batch:1,model:0", "model:0", ">= 1"),
    "mesh axis twice": Cli("info --mesh=batch:2,batch:2", "'batch'", "twice"),
    "mesh without batch axis": Cli("info --mesh=model:4", "--mesh=model:4", "'batch:1,model:4'"),
    "mesh disagrees with tp": Cli("train --mesh=batch:2,model:2 --tp=4",
                                  "--mesh=batch:2,model:2 and --tp=4", "Give one of them"),
    "layouts unknown": Cli("train --strategy=tensor --layouts=zigzag", "--layouts=zigzag",
                           "'megatron' or 'replicated'"),
    "split points twice": Cli("train --pp=3 --split_points=block_1,block_1",
                              "block_1,block_1", "each split point begins a new stage"),
    "split points and stages disagree": Cli(
        "train --strategy=pipeline --pipeline_stages=3 --split_points=block_1",
        "--pipeline_stages=3", "give K-1 split points"),
    "microbatches zero": Cli("train --pp=2 --microbatches=0", "--microbatches=0", ">= 1"),
    "microbatches without a pipeline": Cli("train --microbatches=4", "--microbatches",
                                           "add --strategy=pipeline"),
    "pipeline needs more devices": Cli("train --pp=4 --num_simulated_devices=2",
                                       "--num_simulated_devices=2",
                                       "use --num_simulated_devices=4"),
    "simulated devices negative": Cli("info --num_simulated_devices=-1",
                                      "--num_simulated_devices=-1", ">= 0"),
    "global batch zero": Cli("train --global_batch_size=0", "--global_batch_size=0", "> 0"),
    "both batch sizes": Cli("train --global_batch_size=64 --per_replica_batch_size=8",
                            "--per_replica_batch_size=8", "give one"),
    "task index without hosts": Cli("train --task_index=1", "--task_index=1",
                                    "same --worker_hosts"),
    "worker hosts twice": Cli("train --worker_hosts=h:1,h:1", "'h:1'", "its own host:port"),
    "worker hosts bad port": Cli("info --worker_hosts=h:1,h:http", "'http'", "1..65535"),
    "task index past the hosts": Cli("train --worker_hosts=h:1,g:1 --task_index=2",
                                     "task index 2", "indices 0..1"),
    "worker hosts with data": Cli("train --strategy=data --worker_hosts=h:1,g:1",
                                  "--strategy=data", "--strategy=multi_worker"),
    "ring all-reduce on one host": Cli("train --strategy=data --all_reduce=ring",
                                       "--all_reduce=ring", "use auto, nccl"),
    "heartbeat zero": Cli("train --heartbeat_timeout=0", "--heartbeat_timeout=0", "> 0"),
    # ------------------------------------------------------ tfpar train
    "model unknown": Cli("train --model=gpt5", "--model=gpt5", "use one of tiny"),
    "layers zero": Cli("train --layers=0", "--layers=0", ">= 1"),
    "keras-hub family unknown": Cli("train --model=keras_hub:bert", "--model=keras_hub:bert",
                                    "use one of keras_hub:gpt2, keras_hub:llama"),
    "keras-hub not installed": Cli("train --model=keras_hub:llama", "--model=keras_hub:llama",
                                   "pip install -e '.[cpu,hub]' && pip install --no-deps "
                                   "'keras-hub==0.32.*'", without=("keras_hub",)),
    "keras-hub model recomputed": Cli("train --model=keras_hub:llama --recompute=full",
                                      "--recompute=full", "use --recompute=none"),
    "keras-hub heads do not divide": Cli("train --model=keras_hub:gemma --hidden=30 --heads=4",
                                         "--hidden=30", "hidden / heads"),
    "train steps not a number": Cli("train --train_steps=1e3", "'1e3'", "int"),
    "train steps zero": Cli("train --train_steps=0", "--train_steps=0", ">= 1"),
    "train steps not a multiple": Cli("train --train_steps=50 --eval_every=20",
                                      "--train_steps=50", "--train_steps=40"),
    "dropout one": Cli("train --dropout=1", "--dropout=1", "[0, 1)"),
    "learning rate zero": Cli("train --learning_rate=0", "--learning_rate=0", "> 0"),
    "vocab given to train": Cli("train --vocab=50304", "--vocab", "drop --vocab"),
    "tokenizer without attribute": Cli("train --tokenizer=json", "'json'", "'package.module:name'",
                                       at_parse=False),
    "tokenizer bpe vocabulary too small": Cli("train --tokenizer=bpe:100", "'bpe:100'",
                                              "[257, 65536]"),
    "tokenizer bpe vocabulary not a number": Cli("train --tokenizer=bpe:4k", "'bpe:4k'",
                                                 "--tokenizer=bpe:4096"),
    "tokenizer file missing": Cli("train --tokenizer={tmp}/tok.json", "tok.json",
                                  "no such file"),
    "tokenizer module missing": Cli("train --tokenizer=no_such_module:Tok",
                                    "'no_such_module:Tok'", "on PYTHONPATH", at_parse=False),
    "tokenizer attribute missing": Cli("train --tokenizer=json:NoTokenizer", "'json:NoTokenizer'",
                                       "check the spelling", at_parse=False),
    "tokenizer not a tokenizer": Cli("train --tokenizer=json:JSONDecoder", "'json:JSONDecoder'",
                                     "vocab_size, encode", at_parse=False),
    "text files match nothing": Cli("train --text_files={tmp}/books/*.txt --output_dir={tmp}/out",
                                    "books/*.txt", "no file matches", at_parse=False),
    "tfds dataset unprepared": Cli(
        "train --dataset=tiny_shakespeare --data_dir={tmp}/tfds --output_dir={tmp}/out",
        "'tiny_shakespeare'", "--text_files=GLOB", at_parse=False,
        setup=lambda tmp: (tmp / "tfds").mkdir()),
    # A checkpoint that cannot be resumed: refused before training, left as it is.
    "checkpoint metadata garbage": Cli(
        "train --output_dir={tmp}/out", "training_metadata.json", "--output_dir",
        at_parse=False, fresh=True, setup=lambda tmp: _backup(tmp, "{'epoch': 1,")),
    "checkpoint weights missing": Cli(
        "train --output_dir={tmp}/out", "backup-e1-b0.weights.h5", "--output_dir",
        at_parse=False, fresh=True, setup=lambda tmp: _backup(tmp, _METADATA, weights=False)),
    "checkpoint of another model": Cli(
        "train --output_dir={tmp}/out", "'layers': 12", "give a new --output_dir",
        at_parse=False, fresh=True, setup=lambda tmp: _backup(tmp, _METADATA, state=_OTHER_MODEL)),
    "train state garbage": Cli(
        "train --output_dir={tmp}/out", "train_state.json", "--output_dir",
        at_parse=False, fresh=True, setup=lambda tmp: _backup(tmp, _METADATA, state="steps: 3")),
    "train state of another program": Cli(
        "train --output_dir={tmp}/out", "train_state.json", "--output_dir",
        at_parse=False, fresh=True, setup=lambda tmp: _backup(tmp, _METADATA, state={"step": 3})),
    "train temperature zero": Cli("train --temperature=0", "--temperature=0", "> 0"),
    "train top_k negative": Cli("train --top_k=-1", "--top_k=-1", ">= 0"),
    # ------------------------------------------------------ tfpar generate
    "generate output dir missing": Cli("generate --output_dir={tmp}/runs/gpt", "runs/gpt",
                                       "run `tfpar train --output_dir="),
    "generate output dir without model": Cli(
        GENERATE, "has no model.keras", "run `tfpar train --output_dir=",
        setup=lambda tmp: (tmp / "out").mkdir()),
    "generate temperature zero": Cli(GENERATE + " --temperature=0", "--temperature=0", "> 0"),
    "generate temperature not a number": Cli(GENERATE + " --temperature=hot", "'hot'", "float"),
    "generate top_k negative": Cli(GENERATE + " --top_k=-1", "--top_k=-1",
                                   ">= 0 (the k most likely tokens; 0 means no limit"),
    "generate top_p zero": Cli(GENERATE + " --top_p=0", "--top_p=0", "(0, 1]"),
    "generate top_p above one": Cli(GENERATE + " --top_p=1.5", "--top_p=1.5", "(0, 1]"),
    "generate max_new_tokens zero": Cli(GENERATE + " --max_new_tokens=0", "--max_new_tokens=0",
                                        ">= 1"),
    "generate max_new_tokens not a number": Cli(GENERATE + " --max_new_tokens=lots", "'lots'",
                                                "int"),
    "generate num_samples zero": Cli(GENERATE + " --num_samples=0", "--num_samples=0", ">= 1"),
    "generate run without tokenizer": Cli(GENERATE, "no tokenizer.json and no summary.json",
                                          "--tokenizer=bytes", setup=_run_dir),
    "generate bpe run without tokenizer.json": Cli(
        GENERATE, "'bpe:4096'", "--tokenizer=PATH/tokenizer.json",
        setup=lambda tmp: _run_dir(tmp, {"tokenizer": "bpe:4096"})),
    "generate tokenizer file missing": Cli(GENERATE + " --tokenizer={tmp}/tok.json", "tok.json",
                                           "no such file", setup=_run_dir),
    "generate tokenizer module missing": Cli(
        GENERATE + " --tokenizer=no_such_module:Tok", "'no_such_module:Tok'", "on PYTHONPATH",
        at_parse=False, setup=_run_dir),
    "generate tokenizer.json garbage": Cli(
        GENERATE, "tokenizer.json", "give a file saved by tfpar train", at_parse=False,
        setup=lambda tmp: _run_dir(tmp, {"tokenizer": "bpe:4096"}, tokenizer_json="{merges")),
    "generate model.keras garbage": Cli(
        GENERATE, "model.keras: not a Keras model", "run `tfpar train --output_dir=",
        at_parse=False, setup=lambda tmp: _run_dir(tmp, {"tokenizer": "bytes"})),
    # ------------------------------------------------------ tfpar plan
    "plan devices missing": Cli("plan --model=gpt2-small --global_batch_size=64", "--devices",
                                "--devices=", at_parse=False),
    "plan devices zero": Cli(PLAN + " --devices=0", "--devices=0", ">= 1"),
    "plan devices per node zero": Cli(PLAN + " --devices_per_node=0", "--devices_per_node=0",
                                      ">= 1"),
    "plan memory negative": Cli(PLAN + " --device_memory=-80", "--device_memory=-80", "> 0"),
    "plan bandwidth zero": Cli(PLAN + " --inter_node_bandwidth=0", "--inter_node_bandwidth=0",
                               "> 0"),
    "plan memory bandwidth zero": Cli(PLAN + " --device_memory_bandwidth=0",
                                      "--device_memory_bandwidth=0", "> 0"),
    "plan efficiency above one": Cli(PLAN + " --efficiency=1.5", "--efficiency=1.5", "(0, 1]"),
    "plan accelerator unknown": Cli(PLAN + " --accelerator=tpu-v9", "--accelerator=tpu-v9",
                                    "a100-80gb"),
    "plan format unknown": Cli(PLAN + " --format=xml", "--format=xml", "table"),
    "plan keras-hub model": Cli("plan --model=keras_hub:llama --devices=8 --global_batch_size=64",
                                "--model=keras_hub:llama", "give a GPT preset"),
    "plan no shape": Cli("plan --devices=8 --global_batch_size=64 --layers=2", "--hidden",
                         "--model=", at_parse=False),
    "plan nothing fits": Cli("plan --model=gpt3-175b --devices=1 --global_batch_size=8",
                             "fits", "", code=1, at_parse=False, stdout=True),
    # ------------------------------------------------------ tfpar launch
    "launch nproc zero": Cli("launch --nproc=0 -- python x.py", "--nproc=0", ">= 1",
                             at_parse=False),
    "launch nproc not a number": Cli("launch --nproc=two -- python x.py", "'two'", "int"),
    "launch restarts negative": Cli("launch --nproc=2 --max_restarts=-1 -- python x.py",
                                    "--max_restarts=-1", ">= 0", at_parse=False),
    "launch without a program": Cli("launch --nproc=2", "no command", "put it after '--'",
                                    at_parse=False),
    # ------------------------------------------------------ tfpar k8s render
    "k8s name not dns-1123": Cli("k8s render --name=My_Job --image=img:1 --workers=2 -- t",
                                 "'My_Job'", "--name='my-job'", at_parse=False),
    "k8s name empty": Cli("k8s render --name= --image=img:1 --workers=2 -- t", "--name=''",
                          "DNS-1123", at_parse=False),
    "k8s image empty": Cli("k8s render --name=lm --image= --workers=2 -- t", "--image=''",
                           "e.g. --image=", at_parse=False),
    "k8s image with spaces": Cli("k8s render --name=lm '--image=my image:1' --workers=2 -- t",
                                 "'my image:1'", "without spaces", at_parse=False),
    "k8s workers zero": Cli(K8S + " --workers=0 -- t", "--workers=0", "at least 1",
                            at_parse=False),
    "k8s workers not a number": Cli(K8S + " --workers=two -- t", "'two'", "int"),
    "k8s gpus negative": Cli(K8S + " --gpus_per_worker=-1 -- t", "--gpus_per_worker=-1", ">= 0",
                             at_parse=False),
    "k8s size typo": Cli(K8S + " --checkpoint_dir=/ckpt --checkpoint_size=10Gx -- t",
                         "'10Gx'", "'16Gi'", at_parse=False),
    "k8s memory typo": Cli(K8S + " --memory=32GB -- t", "'32GB'", "'16Gi'", at_parse=False),
    "k8s cpu words": Cli(K8S + " '--cpu=4 cores' -- t", "'4 cores'", "'500m'", at_parse=False),
    "k8s namespace upper case": Cli(K8S + " --namespace=ML -- t", "'ML'", "DNS-1123",
                                    at_parse=False),
    "k8s kind unknown": Cli(K8S + " --kind=helm -- t", "'helm'", "jobset", at_parse=False),
    "k8s checkpoint dir relative": Cli(K8S + " --checkpoint_dir=ckpt -- t", "'ckpt'",
                                       "bucket URL", at_parse=False),
    "k8s name missing": Cli("k8s render --image=img:1 --workers=2 -- t", "--name",
                            "e.g. `tfpar k8s render", at_parse=False),
    "k8s no command": Cli(K8S, "no training command", "put it after '--'", at_parse=False),
    "k8s output not written": Cli(K8S + " --name=Bad --output={tmp}/out/job.yaml -- t",
                                  "'Bad'", "--name='bad'", at_parse=False,
                                  setup=lambda tmp: (tmp / "out").mkdir()),
    "k8s grace period zero": Cli(K8S + " --grace_period=0 -- t", "--grace_period=0",
                                 "at least 1 second",
                                 at_parse=False),
}


# ------------------------------------------------------- library inputs
def _tensor_parallel(mesh, key, axes, units=8, layout_mesh=None):
    """TensorParallel(mesh, layout_map) building one Dense(units) on 8 inputs; the
    LayoutMap is written for `layout_mesh` (default: the same mesh)."""
    parts = [p.split(":") for p in (layout_mesh or mesh).split(",")]
    keras_mesh = keras.distribution.DeviceMesh(tuple(int(n) for _, n in parts),
                                               tuple(a for a, _ in parts))
    layout_map = keras.distribution.LayoutMap(keras_mesh)
    layout_map[key] = axes
    strategy = tfpar.TensorParallel(mesh, layout_map)
    with strategy.scope():
        keras.layers.Dense(units, name="mlp_up").build((None, 8))


def _split(split_points, num_stages=None):
    """The stages of a chain of three Dense layers: first, middle, last."""
    x = inputs = keras.Input((8,), name="x")
    for name in ("first", "middle", "last"):
        x = keras.layers.Dense(8, name=name)(x)
    return split.plan(keras.Model(inputs, x), num_stages=num_stages, split_points=split_points)


def _job(**changes):
    return JobSpec(**{"name": "lm", "image": "img:1", "workers": 2, "command": ["t"]} | changes)


def _hardware(**changes):
    return Hardware(**{"devices": 8} | changes)


def _task(role="worker", index=0, **cluster):
    return {"cluster": cluster, "task": {"type": role, "index": index}}


LIBRARY_CASES = {
    "ParallelDims zero": Lib(lambda: ParallelDims(dp=0), ParallelDimsError, "dp=0",
                             "whole number >= 1"),
    "ParallelDims negative": Lib(lambda: ParallelDims(tp=-2), ParallelDimsError, "tp=-2",
                                 "whole number >= 1"),
    "ParallelDims not a number": Lib(lambda: ParallelDims(pp="2"), ParallelDimsError, "pp='2'",
                                     "whole number"),
    "ParallelDims product mismatch": Lib(
        lambda: ParallelDims(dp=2, tp=2).validate(8), ParallelDimsError,
        "data 2 x sharded data 1 x tensor 2", "--dp=4"),
    "ParallelDims hsdp with tp": Lib(
        lambda: ParallelDims(dp=2, fsdp=2, tp=2).check_runnable(), ParallelDimsError,
        "dp=2 x fsdp=2", "without --tp"),
    "ParallelDims zero stage": Lib(lambda: ParallelDims(fsdp=2, zero_stage=0), ParallelDimsError,
                                   "zero_stage=0", "3 (+ weights, FSDP)"),
    "ShardedDataParallel zero stage": Lib(
        lambda: tfpar.ShardedDataParallel(fsdp=4, zero_stage=4), ParallelDimsError,
        "zero_stage=4", "1 (optimizer state sharded)"),
    "ParallelDims fsdp x pp x dp unsupported": Lib(
        lambda: ParallelDims(fsdp=2, pp=2, dp=2).check_runnable(), ParallelDimsError,
        "dp=2 x fsdp=2", "--fsdp=4 --zero_stage=3 without --dp"),
    "ParallelDims schedule unknown": Lib(
        lambda: ParallelDims(pp=2, schedule="zigzag"), ParallelDimsError, "'zigzag'",
        "use one of"),
    "ParallelDims foreign mesh axis": Lib(
        lambda: ParallelDims.from_mesh("batch:2,expert:2"), ParallelDimsError, "'expert'",
        "tfpar's mesh axes are"),
    "ParallelDims world size mismatch": Lib(
        lambda: ParallelDims.from_dict({"dp": 2, "world_size": 3}), ParallelDimsError,
        "world_size=3", "product 2"),
    "mesh empty": Lib(lambda: parse_mesh(""), MeshError, "''", "e.g. 'batch:2,model:2'"),
    "mesh size not a number": Lib(lambda: parse_mesh("batch:2,model:x"), MeshError,
                                  "'model:x'", "e.g. 'model:4'"),
    "mesh axis name": Lib(lambda: parse_mesh("batch:2,2:model"), MeshError, "'2:model'",
                          "'axis:size'"),
    "LayoutMap unknown axis": Lib(
        lambda: _tensor_parallel("batch:2,model:2", "mlp_up/kernel", ("expert", None),
                                 layout_mesh="batch:2,expert:2"), LayoutError,
        "'expert'", "the mesh has ['batch', 'model']"),
    "LayoutMap does not divide": Lib(
        lambda: _tensor_parallel("batch:1,model:4", "mlp_up/kernel", (None, "model"), units=6),
        LayoutError, "dimension 6", "replicate this dimension"),
    "LayoutMap wrong rank": Lib(
        lambda: _tensor_parallel("batch:2,model:2", "mlp_up/kernel", ("model",)), LayoutError,
        "layout ('model',)", "one entry (mesh axis or None) per dimension"),
    "layout preset unknown": Lib(
        lambda: tfpar.TensorParallel("batch:2,model:2", "zigzag"), LayoutError,
        "'zigzag'", "megatron"),
    "TensorParallel mesh without batch": Lib(
        lambda: tfpar.TensorParallel("model:4"), MeshError, "['model']",
        "'batch:1,model:4'"),
    "split point unknown layer": Lib(lambda: _split(["midle"]), PipelineSplitError, "'midle'",
                                     "its layers are"),
    "split points twice": Lib(lambda: _split(["middle", "middle"]), PipelineSplitError,
                              "['middle', 'middle']", "distinct layers"),
    "split point first layer": Lib(lambda: _split(["first"]), PipelineSplitError, "'first'",
                                   "stages 1, 2"),
    "split stages too many": Lib(lambda: _split(None, num_stages=5), PipelineSplitError,
                                 "stages=5", "Use fewer stages"),
    "Pipeline stages and split points": Lib(
        lambda: tfpar.Pipeline(stages=3, split_points=["middle"]), PipelineConfigError,
        "stages=3", "K-1 split points for K stages"),
    "Pipeline microbatches zero": Lib(lambda: tfpar.Pipeline(microbatches=0),
                                      PipelineConfigError, "microbatches=0", "integer >= 1"),
    "TF_CONFIG empty cluster": Lib(lambda: Cluster.from_tf_config(_task()), ClusterConfigError,
                                   "{}", '"cluster": {"worker"'),
    "TF_CONFIG job a string": Lib(lambda: Cluster.from_tf_config(_task(worker="w0:1")),
                                  ClusterConfigError, "'w0:1'", "list of 'host:port'"),
    "TF_CONFIG task type absent": Lib(
        lambda: Cluster.from_tf_config(_task("chief", worker=["w0:1"])), ClusterConfigError,
        "'chief'", "fix the task type"),
    "TF_CONFIG host with spaces": Lib(lambda: Cluster.from_tf_config(_task(worker=["w 0:1"])),
                                      ClusterConfigError, "'w 0'", "Remove it"),
    "JobSpec name upper case": Lib(lambda: _job(name="LM"), K8sSpecError, "'LM'", "--name='lm'"),
    "JobSpec name too long for pods": Lib(
        lambda: render(_job(name="x" * 62, workers=11)), K8sSpecError,
        "'xxxx", "horten the name"),
    "JobSpec image with spaces": Lib(lambda: _job(image="a b"), K8sSpecError, "'a b'",
                                     "without spaces"),
    "JobSpec size typo": Lib(lambda: _job(checkpoint_dir="/c", checkpoint_size="10Gx"),
                             K8sSpecError, "'10Gx'", "'16Gi'"),
    "JobSpec gpus negative": Lib(lambda: _job(gpus_per_worker=-1), K8sSpecError,
                                 "--gpus_per_worker=-1", "integer >= 0"),
    "Hardware devices zero": Lib(lambda: _hardware(devices=0), ValueError, "devices=0", "> 0"),
    "Hardware memory negative": Lib(lambda: _hardware(memory_gib=-1), ValueError,
                                    "memory_gib=-1", "> 0"),
    "Hardware efficiency zero": Lib(lambda: _hardware(efficiency=0), ValueError,
                                    "efficiency=0", "(0, 1]"),
    "Hardware memory bandwidth zero": Lib(lambda: _hardware(memory_gbps=0), ValueError,
                                          "memory_gbps=0", "> 0"),
    "tokenizer spec empty": Lib(lambda: load_tokenizer(""), TextDataError, "''", "'bytes'"),
    "tokenizer module missing": Lib(lambda: load_tokenizer("nope.tok:T"), TextDataError,
                                    "'nope.tok:T'", "on PYTHONPATH"),
    "tokenizer attribute missing": Lib(lambda: load_tokenizer("json:Nope"), TextDataError,
                                       "'json:Nope'", "check the spelling"),
    "text files match nothing": Lib(lambda: file_documents("/no/such/dir/*.txt"), TextDataError,
                                    "'/no/such/dir/*.txt'", "no file matches"),
    "TFDS dataset unknown": Lib(lambda: prepare("no_such_dataset_xyz", "tfds"),
                                TextDataError, "'no_such_dataset_xyz'", "--text_files"),
}


def test_the_matrix_has_at_least_60_cases():
    assert len(CLI_CASES) + len(LIBRARY_CASES) >= 60


# ----------------------------------------------------------------- checks
def snapshot(root: Path) -> dict:
    """{relative path: (size, mtime)} of every file and directory under root."""
    found = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        found[str(path.relative_to(root))] = (None if path.is_dir() else stat.st_size,
                                              stat.st_mtime_ns)
    return found


def check_output(case: Cli, code: int, out: str, err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert code == case.code, f"exit {code}, not {case.code}: {err}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err}"
    prefix = f"tfpar {case.command}:" if case.command else "tfpar:"
    assert lines[0].startswith(prefix), lines[0]
    assert case.value in lines[0], f"{case.value!r} not named: {lines[0]}"
    assert case.fix in lines[0], f"no fix ({case.fix!r}): {lines[0]}"
    if not case.stdout:
        assert out == "", out


def argv(case: Cli, tmp: Path) -> list[str]:
    return [word.replace("{tmp}", str(tmp)) for word in shlex.split(case.args)]


@pytest.fixture
def case_dir(tmp_path, monkeypatch):
    """The case's directory: its working directory, TFDS data dir and files."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds-default"))
    return tmp_path


def _refuse(stage):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a parse-time error reached {stage}")
    return refuse


@pytest.mark.parametrize("name", [n for n, c in CLI_CASES.items() if not c.fresh])
def test_a_bad_command_line_gives_one_line_and_writes_nothing(name, case_dir, capsys,
                                                              monkeypatch):
    case = CLI_CASES[name]
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    for module in case.without:
        monkeypatch.setitem(sys.modules, module, None)  # find_spec and import: not installed
    if case.setup:
        case.setup(case_dir)
    if case.at_parse:
        monkeypatch.setattr(cli_main.logs, "import_tensorflow", _refuse("TensorFlow"))
        if case.command in cli_main._BY_NAME:
            command = cli_main._BY_NAME[case.command]
            monkeypatch.setitem(cli_main._BY_NAME, case.command,
                                dataclasses.replace(command, run=_refuse(case.command)))
    before = snapshot(case_dir)
    code = cli_main.main(["tfpar", *argv(case, case_dir)])
    out, err = capsys.readouterr()
    check_output(case, code, out, err)
    assert snapshot(case_dir) == before


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", [n for n, c in CLI_CASES.items() if c.fresh])
def test_a_bad_checkpoint_gives_one_line_and_is_left_as_it_is(name, case_dir):
    case = CLI_CASES[name]
    case.setup(case_dir)
    before = snapshot(case_dir)
    env = dict(os.environ, **case.env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # what a user's shell has
    result = subprocess.run([sys.executable, "-m", "tfpar.cli.main", *argv(case, case_dir)],
                            capture_output=True, text=True, timeout=240, env=env,
                            cwd=case_dir / "cwd")
    check_output(case, result.returncode, result.stdout, result.stderr)
    assert snapshot(case_dir) == before


@pytest.mark.parametrize("name", list(LIBRARY_CASES))
def test_a_bad_library_input_raises_its_documented_error(name, case_dir):
    case = LIBRARY_CASES[name]
    assert issubclass(case.error, ValueError)
    before = snapshot(case_dir)
    with pytest.raises(Exception) as caught:
        case.call()
    assert isinstance(caught.value, case.error), (
        f"{type(caught.value).__name__}, not {case.error.__name__}: {caught.value}")
    message = str(caught.value)
    assert "\n" not in message.strip(), message
    assert case.value in message, f"{case.value!r} not named: {message}"
    assert case.fix in message, f"no fix ({case.fix!r}): {message}"
    assert snapshot(case_dir) == before

"""`tfpar train`: trains the reference GPT, or a keras-hub model, on text (`tfpar.train`)."""

from __future__ import annotations

from tfpar import flags as tfpar_flags
from tfpar.cli.flags import Command, write_error
from tfpar.models.flags import define_model_flags
from tfpar.train.flags import define_train_flags


def run(fv, program) -> int:
    from tfpar.data.text import TextDataError
    from tfpar.parallel_dims import ParallelDimsError
    from tfpar.strategies.pipeline import PipelineConfigError, PipelineSplitError
    from tfpar.strategies.tensor.layouts import LayoutError
    from tfpar.strategies.tensor.mesh import MeshError
    from tfpar.plan import handoff
    from tfpar.train import TrainConfigError, config_from_flags, run as run_job

    try:
        if fv.plan:
            handoff.apply(fv, fv.plan)
        strategy = tfpar_flags.from_flags(fv)
        run_job(config_from_flags(strategy, flag_values=fv), strategy)
    except (TrainConfigError, TextDataError, FileNotFoundError, MeshError, LayoutError,
            PipelineConfigError, PipelineSplitError, ParallelDimsError,
            handoff.PlanFileError) as e:
        write_error("train", str(e))
        return 2
    return 0


COMMAND = Command(
    name="train",
    summary="train the reference GPT (or --model=keras_hub:llama ...) on text",
    usage="[--plan PLAN.json | --dp N --tp N --pp N | --strategy NAME] [--model SIZE] "
          "[--dataset NAME | --text_files GLOB] [--train_steps N] [--output_dir DIR] ...",
    example="tfpar train --dp=2 --tp=2 --num_simulated_devices=4 --train_steps=200",
    groups=(("model", define_model_flags),
            ("strategy and parallel degrees", tfpar_flags.define_strategy_flags),
            ("train", define_train_flags)),
    run=run,
    uses_tensorflow=True,
)

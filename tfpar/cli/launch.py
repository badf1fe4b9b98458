"""`tfpar launch`: runs a command as N local workers (tfpar's torchrun)."""

from __future__ import annotations

from absl import flags

from tfpar.cli.flags import Command, UsageError, define_restart_flags
from tfpar.flags import flag_group


@flag_group
def define_launch_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("nproc", 1, "Number of worker processes on this host.", flag_values=fv)
    flags.DEFINE_bool("private_network", False,
                      "Run all ranks in one new network namespace with loopback only, so that "
                      "their gRPC ports (unauthenticated, bound to every interface) cannot be "
                      "reached from other hosts. The ranks then have no network either: data "
                      "and checkpoints must be local. Linux, as root.", flag_values=fv)
    define_restart_flags(fv, max_restarts=0, grace_period=10.0)


def run(fv, program) -> int:
    from tfpar.launch import Launcher, LaunchError

    try:
        launcher = Launcher(nproc=fv.nproc, max_restarts=fv.max_restarts,
                            grace_period_s=fv.grace_period,
                            private_network=fv.private_network)
        return launcher.run(program or [])
    except LaunchError as e:
        raise UsageError(str(e)) from None


COMMAND = Command(
    name="launch",
    summary="run a command as N local workers (tfpar's torchrun)",
    usage="--nproc N [--max_restarts R] [--grace_period S] [--private_network] "
          "-- program [args...]",
    example="tfpar launch --nproc 2 -- python train.py --strategy=multi_worker",
    groups=(("launch", define_launch_flags),),
    run=run,
    takes_program=True,
)

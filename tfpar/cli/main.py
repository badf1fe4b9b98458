"""`tfpar <command> [flags] [-- program ...]`.

Commands (one module each, a thin layer over the library):
  train       train the reference GPT (or --model=keras_hub:llama ...) on text
  generate    sample text from the model a tfpar train run saved
  plan        recommend data/tensor/pipeline degrees for a model and a cluster
  info        devices, versions, the strategy and degrees the flags give, the cluster
  launch      run a command as N local workers (tfpar's torchrun)
  k8s render  Kubernetes manifests for a multi-worker job

Each command parses its own flags (`tfpar <command> --help` lists them), so
`tfpar info --dp=2 --tp=2 --num_simulated_devices=4` describes exactly what
a training script given the same flags would build. Exit codes: 0 done,
1 the command ran and failed (plan: nothing fits), 2 a usage error.
"""

from __future__ import annotations

import sys

from tfpar.cli import generate, info, k8s, launch, logs, plan, train
from tfpar.cli.flags import UsageError, parse, usage, wants_help, write_error

COMMANDS = (train.COMMAND, generate.COMMAND, plan.COMMAND, info.COMMAND, launch.COMMAND,
            k8s.COMMAND)
_BY_NAME = {c.name: c for c in COMMANDS}


def main(argv: list[str]) -> int:
    args = argv[1:]
    if args[:1] and args[0] in ("--help", "-h", "-help", "--helpfull", "help"):
        sys.stdout.write(usage(COMMANDS))
        return 0
    name, rest = _command_name(args)
    if name is None:
        if args[:1] == ["k8s"]:
            got = repr(args[1]) if args[1:] else "nothing"
            sys.stderr.write(f"tfpar k8s: expected 'render' after 'k8s', got {got}; "
                             "see tfpar k8s render --help\n")
        elif args:
            names = ", ".join(c.name for c in COMMANDS)
            sys.stderr.write(f"tfpar: unknown command {args[0]!r}; the commands are {names}; "
                             "see tfpar --help\n")
        else:
            sys.stderr.write(usage(COMMANDS))
        return 2
    command = _BY_NAME[name]
    if wants_help(rest):
        sys.stdout.write(command.help())
        return 0
    from tfpar.cluster import ClusterConfigError
    from tfpar.devices import DeviceConfigError
    from tfpar.flags import discover_from_flags
    from tfpar.parallel_dims import ParallelDimsError

    try:
        fv, program = parse(command, rest, COMMANDS)
        if "worker_hosts" in fv:
            # A malformed TF_CONFIG is a usage error, reported before TensorFlow starts.
            discover_from_flags(fv)
        logs.configure(fv.verbosity, chief=logs.is_chief(fv))
        if command.uses_tensorflow:
            from tfpar import memory

            memory.enable_cpu_statistics()  # a step's peak bytes on CPU too (tfpar.memory)
            logs.import_tensorflow()
        return command.run(fv, program)
    except (UsageError, ClusterConfigError, DeviceConfigError, ParallelDimsError) as e:
        write_error(name, str(e))
        return 2


def _command_name(args: list[str]) -> tuple[str | None, list[str]]:
    """("k8s render", rest) for `k8s render ...`, (None, args) for no or an unknown command."""
    if not args:
        return None, args
    if args[0] == "k8s":
        if args[1:2] == ["render"]:
            return "k8s render", args[2:]
        if wants_help(args[1:2]):
            return "k8s render", args[1:]
        return None, args
    return (args[0], args[1:]) if args[0] in _BY_NAME else (None, args)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()

"""What every `tfpar` command shares: its description, its own flags, parsing, help.

Each command parses its own `absl.flags.FlagValues`, holding only the flags
it reads, so `tfpar plan --help` lists the plan's flags and `--nproc` given
to `tfpar train` is an error that names the command it belongs to::

    $ tfpar train --nproc=2
    tfpar train: --nproc is a flag of 'tfpar launch', not of 'tfpar train'; see tfpar train --help

The flags are the library's (`tfpar.flags.define_strategy_flags`,
`tfpar.train.flags.define_train_flags`, ...); this module only groups them
into commands.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
from typing import Callable, Sequence

from absl import flags

from tfpar.flags import define_flags, flag_group

HELP_ARGS = ("--help", "-h", "-help", "--helpfull", "--helpshort", "-?")


class UsageError(Exception):
    """A command line that cannot run; the message says why and what to type."""


@flag_group
def define_verbosity_flag(fv: flags.FlagValues) -> None:
    """--verbosity, which every command has (see `tfpar.cli.logs`)."""
    flags.DEFINE_integer("verbosity", -1,
                         "Logging: -2 errors only, -1 also warnings, 0 also info (TensorFlow's "
                         "and absl's too), 1 also debug. TensorFlow logs errors only below 0; "
                         "non-chief workers log warnings and errors only.", flag_values=fv)


def define_restart_flags(fv: flags.FlagValues, *, max_restarts: int,
                         grace_period: float) -> None:
    """--max_restarts and --grace_period: the same meaning for `tfpar launch` and
    `tfpar k8s render`, each command with its own defaults."""
    define_flags(fv, {
        "max_restarts": (flags.DEFINE_integer, max_restarts,
                         "Restart the whole group of workers this many times after a failure "
                         "(the script resumes from its BackupAndRestore backup)."),
        "grace_period": (flags.DEFINE_float, grace_period,
                         "Seconds between SIGTERM and SIGKILL when stopping workers: time to "
                         "save a checkpoint."),
    })


@dataclasses.dataclass(frozen=True)
class Command:
    """One `tfpar` command: what it does, its flags, and how it runs.

    Attributes:
      name: as typed after `tfpar` ("train", "k8s render").
      summary: one line.
      usage: the synopsis after `tfpar NAME`.
      example: one command line that works.
      groups: (title, define function) in the order help shows them; each
        define function takes a FlagValues (they are idempotent, so a group
        may define another's flags first: only the new ones are listed
        under its title).
      run: `run(flag_values, program) -> exit code`; program is what follows
        `--` (None when absent). It imports TensorFlow only if it needs it.
      takes_program: whether a program follows `--` (launch, k8s render).
      uses_tensorflow: whether it runs TensorFlow (imported, quietly, before
        it runs: see `tfpar.cli.logs.import_tensorflow`).
    """

    name: str
    summary: str
    usage: str
    example: str
    groups: tuple[tuple[str, Callable[[flags.FlagValues], object]], ...]
    run: Callable[[flags.FlagValues, list[str] | None], int]
    takes_program: bool = False
    uses_tensorflow: bool = False

    def flag_values(self) -> flags.FlagValues:
        """A fresh FlagValues with this command's flags (and --verbosity)."""
        return self._build()[0]

    def _build(self) -> tuple[flags.FlagValues, list[tuple[str, list[str]]]]:
        fv = flags.FlagValues()
        sections = []
        for title, define in (*self.groups, ("logging", define_verbosity_flag)):
            before = set(fv)
            define(fv)
            sections.append((title, [name for name in fv if name not in before]))
        return fv, [(title, names) for title, names in sections if names]

    def help(self) -> str:
        """The summary, usage, an example and every flag with its default."""
        fv, sections = self._build()
        lines = [f"tfpar {self.name}: {self.summary}", "",
                 f"usage: tfpar {self.name} {self.usage}", "", "example:",
                 f"  {self.example}"]
        for title, names in sections:
            lines += ["", f"{title} flags:"]
            for name in sorted(names):
                flag = fv[name]
                lines.append(f"  --{name}  (default: {_default_text(flag)})")
                lines.append(textwrap.fill(flag.help, width=88, initial_indent=" " * 6,
                                           subsequent_indent=" " * 6))
        return "\n".join(lines) + "\n"


def _default_text(flag) -> str:
    value = flag.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "''"
    if value == "":
        return "''"
    return str(value)


def parse(command: Command, args: Sequence[str],
          commands: Sequence[Command]) -> tuple[flags.FlagValues, list[str] | None]:
    """Parses `args` (what follows `tfpar NAME`) into the command's FlagValues.

    Returns (flag_values, program): program is everything after `--`, untouched,
    or None if there is no `--`. Raises UsageError for a flag of another
    command, an unknown flag, a bad value, or stray arguments. `--help` is
    the caller's (see `wants_help`).
    """
    args = list(args)
    program = None
    if "--" in args:
        at = args.index("--")
        args, program = args[:at], args[at + 1:]
    fv = command.flag_values()

    def error(message):
        hint = f"tfpar {command.name} --help"
        return UsageError(f"{message} See {hint}." if message.endswith(".")
                          else f"{message}; see {hint}")

    try:
        positional = fv([f"tfpar {command.name}", *args])[1:]
    except flags.UnrecognizedFlagError as e:
        owners = _owners(e.flagname, command, commands)
        if owners:
            raise error(f"--{e.flagname} is a flag of {' and '.join(owners)}, not of "
                        f"'tfpar {command.name}'") from None
        raise error(str(e)) from None
    except flags.Error as e:
        # absl puts every checked flag's value before a validator's message,
        # which names its own flags: "flags dp=None, tp=2, ...: --tp=2 ...".
        raise error(re.sub(r"^flags? .*?: (?=--)", "", str(e))) from None
    if positional:
        where = ("put the program and its flags after '--'" if command.takes_program
                 else f"'tfpar {command.name}' takes flags only")
        raise error(f"unexpected argument(s) {' '.join(positional)}: {where}")
    if program is not None and not command.takes_program:
        raise error(f"unexpected argument(s) after '--': {' '.join(program) or '(none)'}: "
                    f"'tfpar {command.name}' runs no program")
    return fv, program


def wants_help(args: Sequence[str]) -> bool:
    """Whether the flags (before any `--`) ask for help."""
    args = list(args)
    flags_part = args[:args.index("--")] if "--" in args else args
    return any(a in HELP_ARGS for a in flags_part)


def _owners(name: str, command: Command, commands: Sequence[Command]) -> list[str]:
    """The other commands that have flag `name` (or `--no<name>` of a boolean)."""
    owners = []
    for other in commands:
        if other.name == command.name:
            continue
        fv = other.flag_values()
        bool_name = name[2:] if name.startswith("no") else None
        if name in fv or (bool_name in fv and fv[bool_name].boolean):
            owners.append(f"'tfpar {other.name}'")
    return owners


def usage(commands: Sequence[Command]) -> str:
    """`tfpar --help`: every command in one line, and where each one's flags are."""
    width = max(len(c.name) for c in commands)
    lines = ["usage: tfpar <command> [flags] [-- program args...]", "", "commands:"]
    lines += [f"  {c.name.ljust(width)}  {c.summary}" for c in commands]
    lines += ["", "`tfpar <command> --help` lists the command's flags, e.g. tfpar plan --help."]
    return "\n".join(lines) + "\n"


def write_error(command_name: str, message: str) -> None:
    sys.stderr.write(f"tfpar {command_name}: {message}\n")

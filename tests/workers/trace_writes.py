"""Runs a command; on rank 1 of a launch, under strace, logging every file it creates or changes.

    trace_writes.py LOG -- COMMAND...

Rank 1 (TFPAR_RANK=1) runs under `strace -f`, which logs to LOG each
syscall that can create, change or remove a file (`--seccomp-bpf`: only
those stop the process, so it runs at nearly full speed). Any other rank,
or a host without strace, runs COMMAND as it is. The tests read LOG to
prove that a non-writing process left nothing in a job's output directory.
"""

import os
import shutil
import sys

WRITE_SYSCALLS = ("open", "openat", "creat", "mkdir", "mkdirat", "rename", "renameat",
                  "renameat2", "unlink", "unlinkat", "rmdir", "truncate", "link", "linkat",
                  "symlink", "symlinkat")


def main(argv):
    log, separator, command = argv[1], argv[2], argv[3:]
    assert separator == "--" and command, __doc__
    strace = shutil.which("strace")
    if os.environ.get("TFPAR_RANK") == "1" and strace:
        command = [strace, "-f", "-qq", "--seccomp-bpf", "-e",
                   "trace=" + ",".join(WRITE_SYSCALLS), "-o", log, *command]
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv)

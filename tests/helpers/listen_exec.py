"""Exec wrapper that hands sockets to a program the way systemd does.

    python listen_exec.py FD[,FD...] NAME[:NAME...] -- PROGRAM [ARGS...]

LISTEN_PID must be the pid of the process that reads it, which the parent only learns after
fork; this wrapper runs in that very process (exec keeps the pid), moves the given fds to
3, 4, ... (where sd_listen_fds(3) looks), sets LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID and
execs the program. Kept free of non-stdlib imports so it starts fast under `python -I -S`.
"""

import fcntl
import os
import sys

START = 3


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--":
        sys.exit("usage: listen_exec.py FD[,FD...] NAME[:NAME...] -- PROGRAM [ARGS...]")
    fds = [int(x) for x in argv[0].split(",") if x]
    names = argv[1]
    program = argv[3:]
    # Move every fd above the target range first, so a source that already sits at 3 or 4
    # is not overwritten by another's dup2 before it has been moved itself.
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, START + len(fds)) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(parked):
        os.dup2(fd, START + i, inheritable=True)
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_FDNAMES"] = names
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execvp(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])

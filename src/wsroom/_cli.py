"""The ``wsroom`` command: a dispatcher to its subcommands (``run``, ``loadtest``).

Kept apart from the subcommands so that ``wsroom --help`` works, and a missing extra is a
one-line error, whatever is installed: ``wsroom loadtest`` needs the ``client`` extra,
``wsroom run`` the ``run`` extra (uvicorn).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """\
usage: wsroom COMMAND [options]

commands:
  run MODULE:APP serve an ASGI app with a wsroom Hub under uvicorn, with production
                 defaults (wsroom run --help; needs the run extra)
  loadtest URL   simulate players against a running wsroom server
                 (wsroom loadtest --help; needs the client extra)"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``wsroom COMMAND ...``; returns the exit status (2 for a usage error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if args[:1] == ["run"]:
        from .runner import main as run

        return run(args[1:])
    if args[:1] != ["loadtest"]:
        problem = f"unknown command {args[0]!r}" if args else "no command"
        print(f"wsroom: {problem}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        from .loadtest import main as loadtest
    except ImportError as exc:  # the client extra (wsproto) is missing
        print(f"wsroom loadtest: {exc}", file=sys.stderr)
        return 2
    return loadtest(args)


if __name__ == "__main__":
    sys.exit(main())

"""The `head-surgeon` command: the engine's headless commands plus the workbench (`attach`, no command).

Imports point one way: this UI module builds on `engine.cli`; the engine never imports the UI."""

from __future__ import annotations

import sys

from engine.cli import build_parser, dispatch


def _workbench(args) -> int:
    from .launch import launch

    return launch(args)


def _add_attach(sub) -> None:
    p = sub.add_parser("attach", help="open the workbench on a run (live or finished) and follow its event log")
    p.add_argument("run", help="run directory (or the session that names it)")
    p.set_defaults(func=_workbench)


def main(argv: list[str] | None = None) -> int:
    from organism.cli import add_parser as add_organism

    parser = build_parser(add_organism, _add_attach)
    parser.set_defaults(func=_workbench)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a relaunch under torchrun repeats
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())

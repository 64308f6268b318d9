"""``python -m edgepeft.agent ...``: the update agent without the rest of the CLI (what a device install runs).

Errors we raise on purpose become one line on stderr and their exit code, as in ``edgepeft``.
"""

from __future__ import annotations

import sys

import typer

from edgepeft.agent.commands import agent
from edgepeft.core.errors import EdgePeftError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help="edgepeft device update agent.")
app.command()(agent)


def main() -> None:
    try:
        app(prog_name="edgepeft agent", standalone_mode=False)
    except EdgePeftError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()

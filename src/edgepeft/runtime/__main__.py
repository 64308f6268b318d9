"""``python -m edgepeft.runtime serve ...``: the runtime commands without the rest of the CLI.

Errors we raise on purpose become one line on stderr and exit code 2, as in ``edgepeft``.
"""

from __future__ import annotations

import sys

import typer

from edgepeft.core.errors import EdgePeftError
from edgepeft.runtime.commands import export_onnx, serve

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="edgepeft device runtime.")
app.command()(serve)
app.command("export-onnx")(export_onnx)


def main() -> None:
    try:
        app(standalone_mode=False)
    except EdgePeftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()

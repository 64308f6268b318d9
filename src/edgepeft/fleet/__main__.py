"""``python -m edgepeft.fleet serve|token ...``: the fleet commands without the rest of the CLI.

Errors we raise on purpose become one line on stderr and exit code 2, as in ``edgepeft``.
"""

from __future__ import annotations

import sys

from edgepeft.core.errors import EdgePeftError
from edgepeft.fleet.commands import fleet_app


def main() -> None:
    try:
        fleet_app(prog_name="edgepeft fleet", standalone_mode=False)
    except EdgePeftError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()

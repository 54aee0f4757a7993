"""Command-line tools over run folders: `compare` (tables and plots), `sweep` (a grid of runs), `export` (ONNX).

Each is run as `python -m ptqkit.tools.<name>`; `cli()` gives them the same behaviour as `ptq_main.py`: errors the user
can fix are one line on stderr with exit status 2, anything else keeps its traceback.
"""
from __future__ import annotations

import logging
import sys
import warnings

from ptqkit.errors import UserError


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    logging.getLogger("MQBENCH").setLevel(logging.WARNING)
    # Known, harmless noise from mqbench-torch2 on torch 2.x (the same filters as ptq_main.py).
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*logger.warn.*")


def cli(main, argv=None) -> int:
    """Run `main(argv)`, turning a UserError into `error: ...` on stderr and exit status 2."""
    setup_logging()
    try:
        return main(argv) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

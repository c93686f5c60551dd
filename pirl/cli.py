"""What every command-line tool of the project shares: one error line for a user mistake, JSON out."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

USER_ERRORS = (ValueError, KeyError, FileExistsError, FileNotFoundError, NotADirectoryError)


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main``; a user mistake prints one clear line (no traceback) and exits 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # LeRobot probes torchcodec (video decoding) at import and logs a multi-page traceback when its
    # FFmpeg libraries are missing; our datasets store images, so its pyav fallback is fine: quiet it.
    logging.getLogger("lerobot.utils.import_utils").setLevel(logging.ERROR)
    try:
        sys.exit(main() or 0)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def check_bounds(parser, args, *, at_least: dict[str, float] | None = None, above: dict[str, float] | None = None):
    """``parser.error`` (usage, one ``error:`` line naming the flag, exit 2) for the first option out of
    its bounds, before any work starts; options left unset (None) pass. ``at_least``: value >= bound;
    ``above``: value > bound."""
    for bounds, ok, word in ((at_least or {}, lambda v, b: v >= b, ">="), (above or {}, lambda v, b: v > b, ">")):
        for name, bound in bounds.items():
            value = getattr(args, name)
            if value is not None and not ok(value, bound):
                parser.error(f"--{name.replace('_', '-')} must be {word} {bound:g} (got {value:g})")


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON at ``path``, replaced atomically (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)

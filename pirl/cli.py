"""What every command-line tool of the project shares: one error line for a user mistake, JSON out."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class MetricsConfig:
    """Prometheus /metrics of a runtime (the ``metrics`` group of pirl-learner and pirl-edge)."""

    # serve /metrics on this port (0: off)
    port: int = 0
    # address /metrics listens on
    address: str = "127.0.0.1"

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"metrics.port: must be in [0, 65535] (got {self.port})")


def parse_config[T](cls: type[T], *, prog: str, args: list[str] | None = None) -> T:
    """The draccus config ``cls`` from the command line, the way LeRobot's CLIs take theirs:
        ``--group.field=value`` for every field, ``--config_path=run.yaml`` for a file (flags override it),
        ``--help`` showing the comment beside each field; ``--latency-ms`` is read as ``--latency_ms`` (the
    spelling other tools use for flags). A user mistake (an unknown field, a value that does
        not parse, one that a config class's validation refuses, a missing config file) prints one
        ``error:`` line naming the field and exits 2, before any work starts."""
    from draccus.argparsing import ArgumentParser
    from draccus.utils import DecodingError, ParsingError

    argv = [_underscored(a) for a in (sys.argv[1:] if args is None else args)]
    try:
        parser = ArgumentParser(config_class=cls, prog=prog, exit_on_error=True)
        # argparse %-formats every help string, so a comment that says "60%" made --help a traceback
        for action in parser.parser._actions:
            if action.help:
                action.help = action.help.replace("%", "%%")
        return parser.parse_args(argv)
    except DecodingError as e:  # a value that does not parse, or a field a config file does not have
        _user_error(prog, str(e).replace("`", ""))
    except ParsingError as e:  # raised while building the config: its validation said why
        cause = e.__cause__
        _user_error(prog, str(cause) if isinstance(cause, ValueError | TypeError) and str(cause) else str(e))
    except FileNotFoundError as e:
        _user_error(prog, f"--config_path: no such file {e.filename}")
    raise AssertionError("unreachable")


def _underscored(arg: str) -> str:
    """``--a-b.c-d=v-w`` -> ``--a_b.c_d=v-w``: dashes in a flag's name (never its value) read as underscores."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def _user_error(prog: str, message: str) -> None:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def require(cfg, group: str = "", *, at_least: dict | None = None, above: dict | None = None) -> None:
    """ValueError naming the first field of ``cfg`` out of its bounds (``group.field: must be >= 1 (got
    0)``): what a config class's ``__post_init__`` calls so the check travels with the field. Fields
    left at None pass (optional)."""
    for bounds, ok, word in ((at_least or {}, lambda v, b: v >= b, ">="), (above or {}, lambda v, b: v > b, ">")):
        for name, bound in bounds.items():
            value = getattr(cfg, name)
            if value is not None and not ok(value, bound):
                raise ValueError(f"{group + '.' if group else ''}{name}: must be {word} {bound} (got {value})")


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON at ``path``, replaced atomically (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)

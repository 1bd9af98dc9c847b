"""The ``hairdiff`` command line: one entry point, one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and keeps its
heavy imports (torch, diffusers) inside ``run`` so that ``hairdiff --help`` is instant.
User errors (``HairDiffError``, a missing file) become one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: name -> (module, one-line help)
COMMANDS = {
    "generate": ("hairdiff_cli.commands.generate", "redraw the hair of a photo from a sketch and a matte"),
    "demo": (
        "hairdiff_cli.commands.demo",
        "the toy model redraws a synthetic portrait's hair from two sketches (--tiny: wiring check)",
    ),
    "prepare": (
        "hairdiff_cli.commands.prepare",
        "make a training set from photos and hair mattes (synthesised sketches)",
    ),
    "eval": ("hairdiff_cli.commands.evaluate", "measure results on a dataset against the inpainting baseline"),
    "train": ("hairdiff_cli.train", "fine-tune a HairDiff adapter (LoRA + sketch channels)"),
    "comfy-run": ("hairdiff_cli.comfy_client", "run a workflow on a ComfyUI server through its HTTP API"),
    "encode-prompt": (
        "hairdiff_cli.commands.encode_prompt",
        "encode a prompt with SD3's text encoders into a --prompt-embeds file",
    ),
}

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (the contract of every error), not usage + error."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="hairdiff", description="HairDiff: sketch-guided hair editing with SD3.5.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A subcommand whose module is not installed (e.g. training without its extra)
            # is listed but explains itself when called.
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_USER_ERROR
    from hairdiff_core.errors import HairDiffError

    try:
        return int(args._run(args) or 0)
    except HairDiffError as exc:
        print(f"hairdiff {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FileNotFoundError as exc:
        # The raiser's own words when it gave some ("dataset folder not found: X"), else
        # "file not found: X"; never both ("file not found: model not found: X").
        if exc.filename:
            what = exc.strerror if exc.strerror and "not found" in exc.strerror else "file not found"
            text = f"{what}: {exc.filename}"
        else:
            text = str(exc)
        print(f"hairdiff {args.command}: error: {text}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"hairdiff {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        # A full disk outside the atomic writer (a library writing a cache, a log) is still
        # the user's to fix, not a bug: one line too.
        from hairdiff_core.fileio import is_disk_full

        if not is_disk_full(exc):
            raise
        where = getattr(exc, "filename", None) or "the output"
        print(
            f"hairdiff {args.command}: error: no space left on the disk while writing {where}: free some space "
            f"(or write to another disk) and run again",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR

"""The ``lsx`` command: ``lsx parity``, ``lsx identify FILE.py:NAME`` and ``lsx explain``.

Exit codes: 0 success, 1 a parity mismatch (or a requested backend missing), 2 a usage error (bad
arguments, a bad FILE:NAME, a callable that raises or returns the wrong thing), printed as one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from lsx import spec
from lsx.cli._explain import explain_text

__all__ = ["CommandError", "explain_text", "main"]


_UNSET = object()


class CommandError(Exception):
    """A problem with the user's input: printed as ``lsx: error: <message>``, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except CommandError as exc:
        print(f"lsx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lsx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_closed()


#: the exit status of a Unix tool killed by SIGPIPE (128 + 13)
EXIT_BROKEN_PIPE = 141


def _stdout_closed() -> int:
    """Whoever read stdout stopped (``lsx parity --json | head``): exit quietly, as Unix tools do.

    stdout is pointed at /dev/null so that the interpreter's final flush does not report the pipe again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsx",
        description="Label-smoothed cross-entropy, defined once: check backends, identify a hand-written loss, "
        "explain the options.",
    )
    parser.add_argument("--version", action="version", version=f"lsx {_version()}")
    parser.set_defaults(command=None)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    parity = sub.add_parser("parity", help="compare every installed backend with the reference and built-ins")
    parity.add_argument("--backends", help="comma-separated subset of numpy,torch,jax,tensorflow,keras")
    parity.add_argument("--json", action="store_true", help="print a JSON report (no table, no progress bar)")
    matrix = parity.add_mutually_exclusive_group()
    matrix.add_argument(
        "--quick", dest="matrix", action="store_const", const="quick", help="eager runs only (no compilation)"
    )
    matrix.add_argument(
        "--full",
        dest="matrix",
        action="store_const",
        const="full",
        help="compiled runs in float64 too (default: eager float64/float32, compiled float32)",
    )
    parity.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=min(2, os.cpu_count() or 1),
        metavar="N",
        help="worker processes running backends side by side (default: %(default)s)",
    )
    parity.set_defaults(matrix="default")
    parity.set_defaults(command="parity", run=_cmd_parity)

    identify = sub.add_parser("identify", help="which label smoothing does a hand-written loss compute?")
    identify.add_argument("target", metavar="FILE.py:NAME", help="a loss function, or a class/nn.Module to instantiate")
    identify.add_argument("--framework", choices=("torch", "jax", "numpy"), help="how to call it (default: detect)")
    identify.add_argument(
        "--init",
        metavar="ARGS",
        help="constructor keyword arguments for a class, literals only, "
        "e.g. 'classes=5, smoothing=0.1' (a class count and a smoothing without default are "
        "inferred)",
    )
    identify.add_argument("--json", action="store_true", help="print a JSON report")
    identify.set_defaults(command="identify", run=_cmd_identify)

    explain = sub.add_parser(
        "explain",
        help="print the formula with the effective options",
        description="Print one element's loss, the smoothed target, the reduction and the gradient with the "
        "options filled in. Options not given take the convention's value, else lsx's default.",
    )
    explain.add_argument("--convention", choices=tuple(spec.CONVENTIONS), help="a preset of lsx.spec.CONVENTIONS")
    explain.add_argument(
        "--label-smoothing", type=float, metavar="E", help="ε in [0, 1]: the mass taken from the label (default 0)"
    )
    explain.add_argument(
        "--spread",
        choices=spec.SPREADS,
        help="where ε goes: 'all' = ε/K on every class (torch, Keras), 'others' = ε/(K−1) on the other classes "
        "(fairseq, T5X) (default 'all')",
    )
    explain.add_argument("--z-loss", type=float, metavar="S", help="add S·w_y·L² per element, L the log-sum-exp (default 0)")
    explain.add_argument(
        "--normalize",
        action="store_true",
        default=None,
        help="KL form: subtract the smoothed target's entropy, so the minimum is 0 (default off)",
    )
    explain.add_argument(
        "--reduction", choices=spec.REDUCTIONS, help="'mean' (default), 'sum', or 'none' (one loss per element)"
    )
    explain.add_argument(
        "--ignore-index",
        type=_ignore_index,
        default=_UNSET,
        metavar="I",
        help="the label of elements that get loss 0: an int, or 'none' for no such label (default -100)",
    )
    explain.add_argument(
        "--empty-mean",
        choices=spec.EMPTY_MEANS,
        help="a mean over no element (all ignored): 'nan' (default, as torch) or 'zero' (as Keras)",
    )
    explain.add_argument("--softcap", type=float, metavar="C", help="cap the logits at C·tanh(x/C) first")
    explain.add_argument("--denominator", type=float, metavar="D", help='the mean divides by D (reduction="mean" only)')
    explain.add_argument("--num-classes", "-K", type=int, metavar="K", help="show q for this K")
    explain.set_defaults(command="explain", run=_cmd_explain)
    return parser


def _version() -> str:
    """The running package's version: ``lsx.__version__``, which pyproject.toml also reads for the package
    metadata (an installed distribution's metadata may describe another copy than the one imported)."""
    import lsx

    return lsx.__version__


def _ignore_index(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'none', got {text!r}") from None


def _console(stderr: bool = False) -> Any:
    """A rich console; where the output is not a terminal (a file, a pipe) nothing is cut at 80 columns."""
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    console.on_broken_pipe = _broken_pipe  # rich's own handler exits with status 1; main() exits with 141
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = FILE_WIDTH
    return console


def _broken_pipe() -> None:
    raise BrokenPipeError


#: the console width when writing to a file or a pipe: wide enough never to cut a table or a line
FILE_WIDTH = 10_000


# --------------------------------------------------------------------------------------------------------
def _cmd_parity(args: argparse.Namespace) -> int:
    from lsx.cli import _parity

    names = list(_parity.BACKENDS)
    requested = None
    if args.backends:
        requested = [n.strip() for n in args.backends.split(",") if n.strip()]
        unknown = [n for n in requested if n not in _parity.BACKENDS]
        if unknown or not requested:
            raise CommandError(f"unknown backend(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(names)}")
        names = requested

    if args.json:
        report = _parity.run(names, matrix=args.matrix, jobs=args.jobs)
        print(json.dumps(report.as_json(), indent=1))
    else:
        report = _run_with_progress(_parity, names, args.matrix, args.jobs)
        _parity.render(report, _console())
    missing = [b.name for b in report.backends if b.status == "not installed"]
    if requested and missing:
        print(f"lsx: requested backend(s) not installed: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0 if report.ok else 1


def _run_with_progress(_parity: Any, names: list[str], matrix: str, jobs: int) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = sum(_parity.steps(_parity.BACKENDS[n](), _parity.RUNS[matrix], _parity.CASES) for n in names)
    columns = (TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=_console(stderr=True), transient=True) as progress:
        task = progress.add_task("parity", total=total)

        def tick(description: str, advance: int) -> None:
            progress.update(task, description=description, advance=advance)

        return _parity.run(names, matrix=matrix, progress=tick, jobs=jobs)


# --------------------------------------------------------------------------------------------------------
def _cmd_identify(args: argparse.Namespace) -> int:
    from lsx.cli import _identify

    try:
        fn, label = _identify.load(args.target, init=args.init)
        result = _identify.identify(fn, framework=args.framework)
    except _identify.ProbeError as exc:
        raise CommandError(str(exc)) from None
    result.name = label
    if args.json:
        print(json.dumps(result.as_json(), indent=1))
    else:
        _identify.render(result, _console())
    return 0


# --------------------------------------------------------------------------------------------------------
def _cmd_explain(args: argparse.Namespace) -> int:
    given = {
        "label_smoothing": args.label_smoothing,
        "spread": args.spread,
        "z_loss": args.z_loss,
        "normalize": args.normalize,
        "reduction": args.reduction,
        "empty_mean": args.empty_mean,
        "softcap": args.softcap,
        "denominator": args.denominator,
    }
    given = {name: value for name, value in given.items() if value is not None}
    if args.ignore_index is not _UNSET:
        given["ignore_index"] = args.ignore_index
    try:
        opts = spec.resolve_options(args.convention, **given)
    except (TypeError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    k = args.num_classes
    if k is not None:
        if k < 1:
            raise CommandError(f"--num-classes must be >= 1, got {k}")
        try:  # exactly the check ``loss`` makes on logits with K classes
            spec.check_layout((1, k), (1,), "index", opts, axis=-1)
        except ValueError as exc:
            raise CommandError(f"-K {k}: {exc}") from None
    print(explain_text(opts, args.convention, k))
    return 0

"""What every ``hesse`` subcommand does the same way: one-line errors, stage messages, and
loading the model and data named on the command line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import torch

from hesse.cli import EXIT_INTERRUPTED, EXIT_USAGE, build_problem
from hesse.errors import HesseError
from hesse.examples import Problem
from hesse.report.folder import check_output_folder


@contextmanager
def one_line_errors() -> Iterator[None]:
    """A :class:`HesseError` becomes ``error: ...`` and exit 2; Ctrl-C one line and exit 130."""
    try:
        yield
    except HesseError as error:
        click.echo(f"error: {' '.join(str(error).split())}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        click.echo("hesse: interrupted; no report was written.", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None


def stage(message: str, quiet: bool) -> None:
    """One plain ``hesse: ...`` line on stderr unless ``quiet``."""
    if not quiet:
        click.echo(f"hesse: {message}", err=True)


def load_problem(request: Any) -> Problem:
    """Check the output folder, pick the default example and thread count, build the problem."""
    check_output_folder(request.out.resolve(), request.overwrite)
    if request.example is None and request.model_spec is None and request.hf_model is None:
        request.example = "digits"
    torch.set_num_threads(request.threads or (1 if request.example else torch.get_num_threads()))
    return build_problem(request.example, request.model_spec, request.checkpoint, request.hf_model,
                         request.data_spec, request.seed, request.quiet)

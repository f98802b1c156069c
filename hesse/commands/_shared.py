"""What every ``hesse`` subcommand does the same way: one-line errors, stage messages, and
loading the model and data named on the command line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from hesse.cli import EXIT_INTERRUPTED, EXIT_USAGE, LOSSES, build_problem, first_samples, one_hot_targets
from hesse.errors import HesseError
from hesse.examples import EXAMPLES, Dataset, Problem
from hesse.operators.data import default_forward
from hesse.report.folder import check_output_folder


@dataclass(kw_only=True)
class ProblemRequest:
    """The options every subcommand shares: model and data (:func:`model_and_data_options`),
    loss, seed, threads and output; each subcommand's request adds its own."""

    example: str | None
    model_spec: str | None
    checkpoint: Path | None
    hf_model: Path | None
    data_spec: str | None
    batch_size: int
    max_samples: int | None
    param_globs: tuple[str, ...]
    loss: str
    seed: int
    threads: int | None
    out: Path
    overwrite: bool
    quiet: bool
    json_only: bool


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


def model_and_data_options(command: Callable) -> Callable:
    """The options naming the model and the data, shared by every subcommand (as ``hesse analyze``)."""
    options = [
        click.option("--example", type=click.Choice(EXAMPLES),
                     help="Built-in example (default: digits if no model is given)."),
        click.option("--model", "model_spec", metavar="FILE.py:FACTORY",
                     help="Python file and function returning the nn.Module."),
        click.option("--checkpoint", type=click.Path(path_type=Path),
                     help="state_dict file for --model (weights_only=True)."),
        click.option("--hf-model", type=click.Path(path_type=Path),
                     help="Local Hugging Face model folder (sequence classifier)."),
        click.option("--data", "data_spec", metavar="NAME|FILE.py:FACTORY",
                     help="digits, mnist1d, or a file and function returning a DataLoader."),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Batch size for built-in data."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


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


def problem_data(problem: Problem, loss: str, batch_size: int, max_samples: int | None) -> Any:
    """Put ``--loss`` on the problem (its criterion; one-hot targets for ``mse``) and return its
    data: the first ``--max-samples`` samples, a built-in dataset in batches of ``--batch-size``."""
    if problem.criterion is None or loss != "cross_entropy":
        problem.criterion = LOSSES[loss]()
    if loss == "mse":
        problem.forward = one_hot_targets(problem.forward or default_forward)
    if isinstance(problem.data, Dataset):
        return problem.data.loader(batch_size, max_samples)
    return problem.data if max_samples is None else first_samples(problem.data, max_samples)

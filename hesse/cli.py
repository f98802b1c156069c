"""The ``hesse`` command: ``hesse analyze`` computes a curvature report for a model.

Every failure the user can fix (missing file, unknown factory, checkpoint or data that is
not one, output folder that exists or cannot be written, bad option values) ends with a
one-line ``error: ...`` on stderr and exit status 2, and no report folder is written. The
checks run before the work: the output folder first, then the files, then the model and
the criterion on the first batch, so a bad input fails in seconds. A bug in hesse itself is
one line with status 1 (``HESSE_DEBUG=1`` shows the traceback). Ctrl-C exits with 130:
during the analyses, the ones that finished are written as an incomplete report
(``"complete": false``); before them, or if none finished, nothing is written. A one-line
message says which.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import pickle
import reprlib
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

import hesse
from hesse.errors import HesseError
from hesse.examples import EXAMPLES, Dataset, Problem, classifier_example, load_dataset, minilm_example
from hesse.examples.datasets import DATASETS
from hesse.operators.curvature import CurvatureOperator
from hesse.operators.data import default_forward, default_num_samples, is_single_batch, to_device
from hesse.report import (
    ANALYSES,
    INDEX_HTML,
    REPORT_JSON,
    SPECTRAL_ANALYSES,
    AnalysisRun,
    AnalysisSettings,
    build_report,
    check_output_folder,
    render,
    run_analyses,
    summary_rows,
    write_report_folder,
)

EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130
DEBUG_VARIABLE = "HESSE_DEBUG"  # set it to 1 to see the traceback of an internal error
CURVATURES = ("hessian", "ggn", "fisher")
LOSSES = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss}
# how a torch.save file starts: a zip archive (torch >= 1.6), or the legacy format's pickle protocol byte
CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")
DATA_EXPECTED = "a DataLoader, a list of (inputs, targets) batches, or one (inputs, targets) batch"
BUDGET_OPTIONS = ("top_k", "budget", "lanczos_steps", "probes", "layer_probes", "tol", "lr")
DEFAULTS: dict[str, Any] = {
    "batch_size": 128, "max_samples": None, "analyses": ",".join(SPECTRAL_ANALYSES),
    **{name: getattr(AnalysisSettings, name) for name in BUDGET_OPTIONS},
}


class FiniteFloatRange(click.FloatRange):
    """A float range that also refuses ``nan`` and ``inf`` (which ``click.FloatRange`` lets through)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class CliError(HesseError):
    """A problem with the command line or the user's files, reported in one line."""


def _fail(message: str, status: int = EXIT_USAGE) -> None:
    """Print ``error: message`` on stderr, as one line, and exit with ``status``."""
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(status)


def _exit_interrupted(message: str) -> None:
    """Print ``hesse: interrupted...`` on stderr and exit with the Ctrl-C status, 130."""
    click.echo(f"hesse: interrupted{message}", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _stage(message: str, quiet: bool) -> None:
    """A one-line stage message on stderr, unless ``--no-progress``."""
    if not quiet:
        click.echo(f"hesse: {message}", err=True)


def describe(error: BaseException) -> str:
    """``Type: first line of the message``, to keep errors from user code on one line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# ---- loading the user's files --------------------------------------------------------------
def load_factory(spec: str, what: str) -> Callable:
    """The callable named by ``path/to/file.py:name`` (the file is imported by path)."""
    path_text, _, name = spec.rpartition(":")
    if not path_text or not name:
        raise CliError(f"--{what} must look like path/to/file.py:function_name, got {spec!r}.")
    path = Path(path_text)
    if not path.is_file():
        raise CliError(f"--{what}: file {path} does not exist.")
    module_name = f"hesse_user_{path.stem}_{uuid.uuid4().hex[:8]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise CliError(f"--{what}: cannot import {path} (is it a .py file?).")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        raise CliError(f"--{what}: importing {path} failed: {describe(error)}") from error
    finally:
        sys.path.remove(str(path.resolve().parent))
    factory = getattr(module, name, None)
    if not callable(factory):
        available = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise CliError(f"--{what}: {path} has no function {name!r}; it defines {available}.")
    return factory


def call_factory(factory: Callable, what: str) -> Any:
    """Call a user factory; its exception becomes a one-line :class:`CliError`."""
    try:
        return factory()
    except Exception as error:
        raise CliError(f"--{what}: {factory.__name__}() raised {describe(error)}") from error


def check_checkpoint_format(path: Path) -> None:
    """Refuse a file that does not start like a ``torch.save`` file (a text file, say)."""
    if not path.is_file():
        raise CliError(f"--checkpoint: file {path} does not exist.")
    with open(path, "rb") as file:
        head = file.read(12)
    if not head.startswith(CHECKPOINT_MAGIC):
        start = f"it starts with {head!r}" if head else "it is empty"
        raise CliError(f"--checkpoint {path} is not a PyTorch checkpoint (torch.save output): {start}; "
                       "save one with torch.save(model.state_dict(), path).")


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a state_dict (or a dict holding one under "state_dict"/"model") with weights_only=True."""
    check_checkpoint_format(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CliError(
            f"--checkpoint: {path} holds Python objects besides tensors, which hesse refuses to unpickle; "
            "save model.state_dict() instead."
        ) from error
    except Exception as error:
        raise CliError(f"--checkpoint: cannot read {path} as a torch checkpoint ({type(error).__name__}).") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CliError(f"--checkpoint: {path} is not a state_dict (a dict of tensors).")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        details = "; ".join(f"{label}: {items[:3]}" for label, items in
                            (("missing", missing), ("unexpected", unexpected), ("shape", mismatched)) if items)
        raise CliError(f"--checkpoint: {path} does not fit the model ({details}).")
    model.load_state_dict(state)


def load_hf_model(folder: Path) -> nn.Module:
    """A Hugging Face sequence classifier from a local folder (no network)."""
    if not folder.is_dir():
        raise CliError(f"--hf-model: folder {folder} does not exist.")
    try:
        from transformers import AutoModelForSequenceClassification
    except ImportError as error:
        raise CliError("--hf-model needs transformers; install it with: pip install 'hesse[minilm]'") from error
    try:
        return AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CliError(f"--hf-model: cannot load a model from {folder}: {str(error).splitlines()[0]}") from error


# ---- assembling the problem ----------------------------------------------------------------
def build_problem(example: str | None, model_spec: str | None, checkpoint: Path | None,
                  hf_model: Path | None, data_spec: str | None, seed: int, quiet: bool) -> Problem:
    """The model and data the options name (the criterion is chosen from --loss afterwards)."""
    sources = [s for s in (example, model_spec, hf_model) if s is not None]
    if len(sources) > 1:
        raise CliError("give only one of --example, --model and --hf-model.")
    if checkpoint is not None and model_spec is None:
        raise CliError("--checkpoint needs --model (the factory that builds the network it fits).")
    if example is not None:
        if data_spec is not None:
            raise CliError(f"--example {example} brings its own data; drop --data (or use --model with --data).")
        if example == "minilm":
            _stage("loading all-MiniLM-L6-v2 (offline)", quiet)
            return minilm_example()
        _stage(f"training the {example} example CNN (seed {seed})", quiet)
        return classifier_example(example, seed=seed)
    if data_spec is None:
        raise CliError("--model and --hf-model need --data (digits, mnist1d or path/to/file.py:make_loader).")
    if model_spec is not None:
        model = call_factory(load_factory(model_spec, "model"), "model")
        if not isinstance(model, nn.Module):
            raise CliError(f"--model: {model_spec} returned a {type(model).__name__}, not a torch.nn.Module.")
        if checkpoint is not None:
            load_checkpoint(model, checkpoint)
        description = model_spec + (f" with weights from {checkpoint}" if checkpoint else "")
    else:
        model = load_hf_model(hf_model)
        description = f"Hugging Face model from {hf_model}"
    if data_spec in DATASETS:
        data: Any = load_dataset(data_spec)
        data_description = data.description
    elif ":" in data_spec:
        data = call_factory(load_factory(data_spec, "data"), "data")
        check_data_source(data, data_spec)
        data_description = f"data from {data_spec}"
    else:
        raise CliError(f"--data: unknown dataset {data_spec!r}; choose {', '.join(DATASETS)} "
                       "or pass path/to/file.py:make_loader.")
    return Problem(model=model.eval(), criterion=None, data=data,
                   info={"model": description, "data": data_description})


def check_data_source(data: Any, spec: str) -> None:
    """Refuse what a ``--data`` factory returned unless it is one batch or a re-iterable of batches."""
    if is_single_batch(data):
        return
    returned = f"--data: {spec} returned {type(data).__name__} {reprlib.repr(data)}"
    if isinstance(data, Iterator):
        raise CliError(f"--data: {spec} returned a {type(data).__name__}, a one-shot iterator, but the "
                       f"curvature needs several passes over the data; return {DATA_EXPECTED} instead.")
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, Mapping)):
        raise CliError(f"{returned}; expected {DATA_EXPECTED}.")
    first = next(iter(data), None)
    if first is None:
        raise CliError(f"--data: {spec} returned an empty {type(data).__name__}; expected {DATA_EXPECTED}.")
    if not is_single_batch(first):
        raise CliError(f"{returned}, whose first item ({type(first).__name__} {reprlib.repr(first)}) is not a "
                       f"batch of tensors; expected {DATA_EXPECTED}.")


def check_criterion(criterion: Any) -> None:
    """Refuse a criterion that is a class (``nn.MSELoss``) or not callable, before it meets a tensor."""
    if isinstance(criterion, type):
        raise CliError(f"the criterion is the class {criterion.__name__}, not a loss object; "
                       f"instantiate it: {criterion.__name__}().")
    if not callable(criterion):
        raise CliError(f"the criterion is a {type(criterion).__name__}, not a loss callable(output, target).")


def _take(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return batch[:n] if batch.ndim > 0 else batch
    if isinstance(batch, Mapping):
        return {k: _take(v, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take(v, n) for v in batch)
    return batch


def first_samples(data: Iterable, max_samples: int) -> list:
    """The batches holding the first ``max_samples`` samples (the last one cut to fit)."""
    out, count = [], 0
    for batch in data:
        n = default_num_samples(batch)
        out.append(batch if count + n <= max_samples else _take(batch, max_samples - count))
        count += min(n, max_samples - count)
        if count >= max_samples:
            break
    return out


def one_hot_targets(forward: Callable) -> Callable:
    """Wrap a forward hook so class-index targets become one-hot (for ``--loss mse``)."""
    def wrapped(model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        output, target = forward(model, batch)
        class_indices = isinstance(target, torch.Tensor) and not target.dtype.is_floating_point
        if class_indices and output.ndim == target.ndim + 1:
            target = nn.functional.one_hot(target, output.shape[1]).movedim(-1, 1).to(output.dtype)
        return output, target

    return wrapped


def make_operator(problem: Problem, data: Any, curvature: str, fisher_kind: str, seed: int) -> CurvatureOperator:
    """The curvature operator the options ask for (products never show progress bars)."""
    common = dict(params=problem.params, forward=problem.forward)
    if curvature == "hessian":
        return hesse.Hessian(problem.model, problem.criterion, data, method=problem.hessian_method, **common)
    if curvature == "ggn":
        return hesse.GGN(problem.model, problem.criterion, data, **common)
    return hesse.Fisher(problem.model, problem.criterion, data, kind=fisher_kind, seed=seed, **common)


def resolve(explicit: dict[str, Any], problem: Problem) -> dict[str, Any]:
    """Option values: given on the command line, else the example's, else the general defaults."""
    return {key: explicit[key] if explicit.get(key) is not None else problem.defaults.get(key, default)
            for key, default in DEFAULTS.items()}


def training_batch_size(explicit: int | None, problem: Problem) -> tuple[int | None, str]:
    """The batch size B of the SGD stability check and where it came from.

    ``--train-batch-size`` if given ("command line"), else the batch size the example was
    trained with ("example training"), else ``None`` ("assumed": full-batch gradient descent).
    """
    if explicit is not None:
        return int(explicit), "command line"
    trained = (problem.info.get("training") or {}).get("batch_size")
    if trained:
        return int(trained), "example training"
    return None, "assumed"


def parse_analyses(text: str, lr: float | None, explicit: bool) -> tuple[str, ...]:
    """The ``--analyses`` list; stability is dropped without ``--lr`` unless asked for explicitly."""
    names = tuple(dict.fromkeys(a.strip() for a in text.split(",") if a.strip()))
    unknown = [a for a in names if a not in ANALYSES]
    if unknown or not names:
        raise CliError(f"--analyses: unknown {unknown or 'empty list'}; choose from {','.join(ANALYSES)}.")
    if "stability" in names and lr is None:
        if explicit:
            raise CliError("the stability analysis needs the training learning rate: pass --lr 0.1 (say).")
        names = tuple(a for a in names if a != "stability")
    return names


# ---- the command ------------------------------------------------------------------------------
@dataclass
class Request:
    """What the command line asks for (the options of ``hesse analyze``)."""

    example: str | None
    model_spec: str | None
    checkpoint: Path | None
    hf_model: Path | None
    data_spec: str | None
    param_globs: tuple[str, ...]
    loss: str
    curvature: str
    fisher_kind: str
    extras: tuple[str, ...]
    train_batch_size: int | None
    seed: int
    device: str
    threads: int | None
    out: Path
    overwrite: bool
    quiet: bool  # --no-progress: neither bars nor stage messages
    json_only: bool
    budgets: dict[str, Any]

    @property
    def progress(self) -> bool:
        """Progress bars: only on a terminal, and not with ``--no-progress``."""
        return not self.quiet and stderr_is_terminal()


@dataclass
class Plan:
    """The resolved settings: option values, analyses and the SGD check's batch size."""

    options: dict[str, Any]
    analyses: tuple[str, ...]
    train_batch_size: int | None  # None: full batch
    train_batch_size_source: str


def stderr_is_terminal() -> bool:
    """True when standard error is an interactive terminal (then progress bars are shown)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class OneLineErrors(click.Group):
    """A command group whose usage errors are one ``error: ...`` line with exit status 2, and whose
    Ctrl-C, wherever click receives it, exits with 130 and one line (never click's ``Aborted!``)."""

    subcommands = {"prune": "hesse.commands.prune", "quantize": "hesse.commands.quantize",
                   "influence": "hesse.commands.influence"}  # imported on use (they import this module)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.subcommands])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.subcommands:
            return getattr(importlib.import_module(self.subcommands[name]), name)
        return super().get_command(ctx, name)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Run the command; in standalone mode turn click's exceptions into one line and an exit status."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            status = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as error:
            error.show()
            sys.exit(error.exit_code)
        except click.ClickException as error:
            _fail(error.format_message())
        except (click.exceptions.Abort, KeyboardInterrupt):
            _exit_interrupted("; nothing was written.")
        sys.exit(status if isinstance(status, int) else 0)


@click.group(cls=OneLineErrors)
@click.version_option(hesse.__version__, prog_name="hesse")
def main() -> None:
    """hesse: curvature (Hessian, GGN, Fisher) analysis of neural-network losses."""


@main.command()
@click.option("--example", type=click.Choice(EXAMPLES),
              help="Built-in example (default: digits if no model is given).")
@click.option("--model", "model_spec", metavar="FILE.py:FACTORY",
              help="Python file and function returning the nn.Module.")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="state_dict file for --model (loaded with weights_only=True).")
@click.option("--hf-model", type=click.Path(path_type=Path),
              help="Local Hugging Face model folder (sequence classifier).")
@click.option("--data", "data_spec", metavar="NAME|FILE.py:FACTORY",
              help="digits, mnist1d, or a file and function returning a DataLoader.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Batch size for built-in data [128; examples: 256].")
@click.option("--max-samples", type=click.IntRange(min=1),
              help="Analyse only the first N samples [all; mnist1d example: 1000; minilm: 8 pairs].")
@click.option("--params", "param_globs", multiple=True, metavar="GLOB",
              help="Analyse only these parameters (names or globs like 'layer4.*'; repeatable) [all trainable].")
@click.option("--loss", type=click.Choice(tuple(LOSSES)), default="cross_entropy", show_default=True,
              help="Training loss (mean-reduced).")
@click.option("--curvature", type=click.Choice(CURVATURES), default="hessian", show_default=True,
              help="Which curvature matrix.")
@click.option("--fisher-kind", type=click.Choice(("mc", "true", "empirical")), default="mc", show_default=True,
              help="Fisher variant for --curvature fisher.")
@click.option("--analyses",
              help=f"Comma list from {','.join(ANALYSES)} [{','.join(SPECTRAL_ANALYSES)}; stability needs --lr].")
@click.option("--landscape", is_flag=True,
              help="Also compute a 2-D loss landscape in random filter-normalised directions.")
@click.option("--sharpness", is_flag=True,
              help="Also measure worst-case (rho=0.05) and average (sigma=0.01) sharpness.")
@click.option("--top-k", type=click.IntRange(min=1), help="Number of top eigenvalues [12].")
@click.option("--budget", type=click.IntRange(min=3),
              help="Matrix-vector products for the trace estimate (Hutch++) [60].")
@click.option("--lanczos-steps", type=click.IntRange(min=1),
              help="Lanczos steps for the density and per-layer eigenvalues [40].")
@click.option("--probes", type=click.IntRange(min=1), help="Random probes for the spectral density [3].")
@click.option("--layer-probes", type=click.IntRange(min=2),
              help="Most columns per block for the per-layer traces (each a product), which stop at 2% accuracy [300].")
@click.option("--tol", type=FiniteFloatRange(min=0, min_open=True),
              help="Relative tolerance of the eigenvalues [1e-3].")
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True),
              help="Training learning rate, for stability [examples: their training lr].")
@click.option("--train-batch-size", type=click.IntRange(min=1),
              help="Batch size the model was trained with, for the SGD stability check [digits, mnist1d "
                   "examples: their training batch size, 32; else full-batch GD, noted in the report].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every random choice (training, probes).")
@click.option("--device", type=click.Choice(("cpu", "cuda")), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for torch [examples: 1; else torch's default].")
@click.option("--out", type=click.Path(path_type=Path), default=Path("hesse-report"), show_default=True,
              help="Report folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing hesse report in --out.")
@click.option("--no-progress", is_flag=True,
              help="Silence the stage messages and the progress bars (bars only when stderr is a terminal).")
@click.option("--json-only", is_flag=True, help="Write report.json only (no index.html, no plots).")
def analyze(landscape: bool, sharpness: bool, no_progress: bool, **options: Any) -> None:
    """Compute the curvature of a model's loss and write report.json and index.html.

    \b
    Examples:
      hesse analyze --example digits --out hesse-report --overwrite
      hesse analyze --model examples/models.py:make_net --data digits --lr 0.05 --train-batch-size 64
      hesse analyze --example minilm --out minilm-report
    """
    extras = tuple(name for name, wanted in (("landscape", landscape), ("sharpness", sharpness)) if wanted)
    budgets = {name: options.pop(name) for name in (*BUDGET_OPTIONS, "batch_size", "max_samples", "analyses")}
    try:
        _analyze(Request(extras=extras, quiet=no_progress, budgets=budgets, **options))
    except HesseError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        _exit_interrupted("; no report was written.")
    except Exception as error:  # a bug in hesse: one line, the traceback on request
        if os.environ.get(DEBUG_VARIABLE):
            raise
        _fail(f"internal error in hesse, no report was written: {describe(error)}; please report it, with the "
              f"traceback that {DEBUG_VARIABLE}=1 shows.", EXIT_INTERNAL)


def _analyze(request: Request) -> None:
    """The steps of ``hesse analyze``; a Ctrl-C during the analyses still writes what finished."""
    started = time.perf_counter()
    _prepare(request)
    problem = build_problem(request.example, request.model_spec, request.checkpoint, request.hf_model,
                            request.data_spec, request.seed, request.quiet)
    plan = _plan(request, problem)
    op = _operator(request, problem, plan)
    check_first_batch(op, request.quiet)
    loss_value, gradient_norm = _loss_and_gradient(op, request.quiet)
    setup_seconds = {"setup": time.perf_counter() - started}
    run = _run(op, request, plan, problem)
    report = build_report(
        command=shlex.join(["hesse", *sys.argv[1:]]), settings=_settings_record(request, plan),
        model_info={"description": problem.info["model"], "num_parameters": op.shape[0],
                    "parameter_tensors": len(op.param_names),
                    "blocks": {name: s.stop - s.start for name, s in op.module_blocks().items()}},
        data_info={"description": problem.info["data"], "num_samples": op.num_samples},
        curvature={"kind": request.curvature, "fisher_kind": request.fisher_kind
                   if request.curvature == "fisher" else None, "loss": request.loss, "operator": repr(op)},
        loss=loss_value, gradient_norm=gradient_norm, run=run, setup_seconds=setup_seconds,
        training=problem.info.get("training"),
    )
    _write(request, report)


def _prepare(request: Request) -> None:
    """Check the output folder and device before any expensive work; pick the example and threads."""
    check_output_folder(request.out.resolve(), request.overwrite)
    if request.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA GPU is available to torch; use --device cpu.")
    if request.example is None and request.model_spec is None and request.hf_model is None:
        request.example = "digits"
    if request.threads is None and request.example is not None:
        request.threads = 1  # the examples' small ops gain little from threads; extra threads crawl on a busy machine
    if request.threads is not None:
        torch.set_num_threads(request.threads)


def _plan(request: Request, problem: Problem) -> Plan:
    """Resolve option values, the analyses to run and the training batch size."""
    options = resolve(request.budgets, problem)
    analyses = parse_analyses(options["analyses"], options["lr"], explicit=request.budgets.get("analyses") is not None)
    analyses += tuple(name for name in request.extras if name not in analyses)
    batch_size, source = training_batch_size(request.train_batch_size, problem)
    if "stability" in analyses and source == "assumed":
        _stage("note: no --train-batch-size given; full-batch GD assumed (pass --train-batch-size B for SGD)",
               request.quiet)
    return Plan(options, analyses, batch_size, source)


def _operator(request: Request, problem: Problem, plan: Plan) -> CurvatureOperator:
    """Apply --loss, --params and --device to the problem and build the curvature operator."""
    if problem.criterion is None or request.loss != "cross_entropy":
        problem.criterion = LOSSES[request.loss]()
    check_criterion(problem.criterion)
    if request.loss == "mse":
        problem.forward = one_hot_targets(problem.forward or default_forward)
    if request.param_globs:  # per-layer blocks become the modules of the chosen parameters
        problem.params, problem.layer_blocks = list(request.param_globs), "module"
    problem.model.to(request.device)
    data = problem.data
    if isinstance(data, Dataset):
        data = data.loader(plan.options["batch_size"], plan.options["max_samples"])
    elif plan.options["max_samples"] is not None:
        cut = _take if is_single_batch(data) else first_samples
        data = cut(data, plan.options["max_samples"])
    return make_operator(problem, data, request.curvature, request.fisher_kind, request.seed)


def check_first_batch(op: CurvatureOperator, quiet: bool) -> None:
    """Run the model and the criterion on the first batch only, through the operator's objective,
    so that bad data, a bad model or a bad criterion fails in seconds, before any full pass."""
    _stage("checking the model and the loss on the first batch", quiet)
    objective = op.objective
    try:
        batch = to_device(next(iter(objective.data)), objective.device)
        with torch.no_grad():
            loss = objective.criterion_loss(*objective.call_model(objective.values(), batch))
    except HesseError:
        raise
    except Exception as error:
        raise CliError(f"running the model and the loss on the first batch failed: {describe(error)}") from error
    if not bool(torch.isfinite(loss)):
        raise CliError(f"the loss on the first batch is {float(loss)}: check the data (and the weights) for "
                       "NaN or inf values.")


def _loss_and_gradient(op: CurvatureOperator, quiet: bool) -> tuple[float, float]:
    """The loss and gradient norm at the weights; an error in the user's model is one line."""
    _stage(f"{op!r}: loss and gradient", quiet)
    try:
        return op.loss(), float(op.gradient().norm())
    except HesseError:
        raise
    except Exception as error:
        raise CliError(f"running the model on the data failed: {describe(error)}") from error


def _run(op: CurvatureOperator, request: Request, plan: Plan, problem: Problem) -> AnalysisRun:
    """Run the analyses; after Ctrl-C, the finished part (or nothing, if none finished)."""
    settings = AnalysisSettings(analyses=plan.analyses, seed=request.seed, layer_blocks=problem.layer_blocks,
                                train_batch_size=plan.train_batch_size,
                                **{name: plan.options[name] for name in BUDGET_OPTIONS})
    try:
        run = run_analyses(op, settings, progress=request.progress,
                           on_start=lambda name: _stage(name, request.quiet))
    except KeyboardInterrupt as error:
        run = error.partial  # type: ignore[attr-defined]
        if not run.results:
            _exit_interrupted(f" during {run.interrupted}; no analysis had finished, so no report was written.")
    for warning in run.warnings:
        _stage(f"warning: {warning}", request.quiet)
    return run


def _settings_record(request: Request, plan: Plan) -> dict[str, Any]:
    """Every setting of the run, as stored in report.json."""
    return {
        **plan.options, "analyses": list(plan.analyses), "train_batch_size": plan.train_batch_size,
        "train_batch_size_source": plan.train_batch_size_source, "example": request.example,
        "model": request.model_spec, "checkpoint": str(request.checkpoint) if request.checkpoint else None,
        "hf_model": str(request.hf_model) if request.hf_model else None, "data": request.data_spec,
        "params": list(request.param_globs) or None, "loss": request.loss, "curvature": request.curvature,
        "fisher_kind": request.fisher_kind, "seed": request.seed, "device": request.device,
        "threads": torch.get_num_threads(), "json_only": request.json_only,
    }


def _write(request: Request, report: dict) -> None:
    """Write the report folder atomically, print the summary; exit 130 if the run was interrupted."""
    rows = summary_rows(report)
    files = {REPORT_JSON: json.dumps(report, indent=1, allow_nan=False)}
    if not request.json_only:
        _stage("drawing the report", request.quiet)
        files[INDEX_HTML] = render(report, rows)
    write_report_folder(request.out, files, request.overwrite)
    width = max(len(label) for label, _ in rows)
    click.echo("\n".join(f"{label:<{width}}  {value}" for label, value in rows))
    written = request.out / (REPORT_JSON if request.json_only else INDEX_HTML)
    if not report["complete"]:
        finished = ", ".join(report["results"]).replace("_", "-")
        _exit_interrupted(f" during {report['interrupted']}; wrote an incomplete report with the finished "
                          f"analyses ({finished}) to {written}.")
    click.echo(f"report written to {written}")

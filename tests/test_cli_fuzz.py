"""Fuzzing ``hesse analyze``: seeded combinations of valid and invalid values of every option.

Each run must end with status 0 (a complete report) or 2 (one ``error: ...`` line on
stderr, no traceback, and the ``--out`` folder exactly as it was). Runs are in-process
(click's ``CliRunner``), on 8-32 digits with tiny budgets; the trained ``--example digits``
model is trained once and reused.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import hesse.cli
from hesse.cli import main
from hesse.examples import classifier_example
from tests.test_cli_errors import permissions  # noqa: F401  (fixture: read-only folders refuse root too)

CASES = 60
SEED = 17
MODELS = Path(__file__).resolve().parents[1] / "examples" / "models.py"
BASE = {"--max-samples": "32", "--top-k": "2", "--budget": "6", "--tol": "1e-2", "--lanczos-steps": "4",
        "--probes": "2", "--layer-probes": "2"}
# option: (valid values, invalid values); {name} stands for a file made by the `files` fixture
OPTIONS: dict[str, tuple[list[str], list[str]]] = {
    "--data": (["digits", f"{MODELS}:make_loader", "{batches}:one_batch"],
               ["cifar99", "{missing}:make", "{batches}:generator", "{batches}:integer", "{batches}:not_batches",
                "{batches}:nan_batch", "digits:"]),
    "--loss": (["cross_entropy", "mse"], ["hinge"]),
    "--curvature": (["hessian", "ggn", "fisher"], ["hessain"]),
    "--fisher-kind": (["mc", "true", "empirical"], ["exact"]),
    "--analyses": (["eigenvalues", "trace", "eigenvalues,trace", "density", "per-layer", "stability",
                    "trace,landscape", "sharpness"], ["", "hessian-art", "eigenvalues,,bogus"]),
    "--top-k": (["1", "2"], ["0", "-1", "two"]),
    "--budget": (["3", "6"], ["2", "x"]),
    "--tol": (["1e-2", "0.5"], ["0", "-1e-3", "nan", "inf"]),
    "--lanczos-steps": (["2", "4"], ["0"]),
    "--probes": (["1", "2"], ["0"]),
    "--layer-probes": (["2", "3"], ["1"]),
    "--lr": (["0.05", "1.0", "100"], ["0", "-0.1", "nan", "inf"]),
    "--train-batch-size": (["1", "16", "1000"], ["0"]),
    "--max-samples": (["8", "32"], ["0"]),
    "--batch-size": (["7", "16", "128"], ["0"]),
    "--params": (["3.*", "*", "1.weight"], ["nomatch.*"]),
    "--checkpoint": (["{checkpoint}"], ["{missing}", "{text}"]),
}
OUTS = ["fresh", "foreign", "read-only", "report"]
FAULTS = sorted(OPTIONS) + [f"--out {kind}" for kind in OUTS[1:]] + ["--example"]

BATCHES = """
import torch

def one_batch():
    torch.manual_seed(0)
    return torch.rand(40, 1, 8, 8), torch.randint(0, 10, (40,))

def generator():
    yield one_batch()

def integer():
    return 3

def not_batches():
    return [1, 2, 3]

def nan_batch():
    inputs, targets = one_batch()
    inputs[0] = float("nan")
    return [(inputs, targets)]
"""


def make_case(index: int) -> dict[str, Any]:
    """One seeded combination: the model source, the options, the --out kind and flags.

    Even cases use valid values only (they may still be refused, e.g. --params that match
    nothing in the example CNN); odd cases break one thing (each of :data:`FAULTS` in turn),
    sometimes two.
    """
    rng = random.Random(SEED * 1000 + index)
    options = dict(BASE)
    source = rng.choices(["model", "example", "none"], [7, 2, 1])[0]
    if source == "model":
        options["--model"] = f"{MODELS}:make_net"
        options["--data"] = rng.choice(OPTIONS["--data"][0])
    elif source == "example":
        options["--example"] = "digits"
    for name, (valid, _) in OPTIONS.items():
        if name != "--data" and rng.random() < 0.3:
            options[name] = rng.choice(valid)
    flags = [flag for flag, p in (("--json-only", 0.8), ("--overwrite", 0.3)) if rng.random() < p]
    out = rng.choice(["fresh", "fresh", "report"] if "--overwrite" in flags else ["fresh"])
    if index % 2:  # every fault in turn, sometimes with a second one
        faults = [FAULTS[(index // 2) % len(FAULTS)]] + (rng.sample(FAULTS, 1) if rng.random() < 0.3 else [])
        for fault in faults:
            if fault.startswith("--out"):
                out = fault.split()[1]
            elif fault == "--example":
                options["--example"] = rng.choice(["cifar", "digits"])  # digits with --model: refused
            else:
                options[fault] = rng.choice(OPTIONS[fault][1])
    return {"options": options, "flags": flags, "out": out}


def case_id(index: int) -> str:
    case = make_case(index)
    return f"{index}-{case['out']}-" + "-".join(k.lstrip("-") for k in case["options"] if k not in BASE)[:60]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The data factories, a checkpoint that fits make_net, a text file, a path that does not exist."""
    folder = tmp_path_factory.mktemp("fuzz-files")
    (folder / "batches.py").write_text(BATCHES)
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    torch.save(net.state_dict(), folder / "net.pt")
    (folder / "notes.txt").write_text("not a checkpoint\n")
    return {"batches": folder / "batches.py", "checkpoint": folder / "net.pt", "text": folder / "notes.txt",
            "missing": folder / "missing.py"}


@pytest.fixture(scope="module")
def trained_digits():
    """The built-in digits example, trained once for every case that asks for it."""
    torch.set_num_threads(1)
    return classifier_example("digits", seed=0)


def _prepare_out(kind: str, folder: Path) -> Path:
    """The --out folder of one kind: fresh, a foreign folder, a read-only empty folder, or a hesse report."""
    out = folder / "out"
    if kind == "foreign":
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
    elif kind == "read-only":
        out.mkdir()
        out.chmod(0o555)
    elif kind == "report":
        out.mkdir()
        (out / "report.json").write_text(json.dumps({"schema": "hesse-report/1"}))
    return out


def _snapshot(out: Path) -> dict[str, bytes] | None:
    """The folder's files and contents (``None`` if it does not exist)."""
    if not out.exists():
        return None
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize("index", range(CASES), ids=case_id)
def test_fuzz(index, files, trained_digits, tmp_path, monkeypatch, permissions):  # noqa: F811
    case = make_case(index)
    monkeypatch.setattr(hesse.cli, "classifier_example", lambda name, seed=0: copy.deepcopy(trained_digits))
    out = _prepare_out(case["out"], tmp_path)
    before = _snapshot(out)
    args = ["analyze", "--threads", "1", "--no-progress", "--out", str(out), *case["flags"]]
    for name, value in case["options"].items():
        args += [name, value.format(**files)]
    try:
        result = CliRunner().invoke(main, args)
    finally:
        out.chmod(0o755) if out.exists() else None
    shown = f"hesse {' '.join(args)}\n{result.output}"
    assert result.exit_code in (0, 2), shown
    assert "Traceback" not in result.output and "internal error" not in result.output, shown
    assert result.exception is None or isinstance(result.exception, SystemExit), shown
    if result.exit_code == 2:
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), shown
        assert _snapshot(out) == before, shown  # nothing written, nothing removed
    else:
        written = sorted(p.name for p in out.iterdir())
        assert written == (["report.json"] if "--json-only" in case["flags"] else ["index.html", "report.json"])
        assert json.loads((out / "report.json").read_text())["complete"] is True


def test_the_cases_cover_every_option_valid_and_invalid():
    """The generator tries every option with valid and with invalid values, and every --out kind."""
    cases = [make_case(i) for i in range(CASES)]
    for name, (valid, invalid) in OPTIONS.items():
        given = [c["options"][name] for c in cases if name in c["options"]]
        assert set(given) & set(valid) and set(given) & set(invalid), name
    assert {c["out"] for c in cases} == set(OUTS)
    assert {"--example" in c["options"] for c in cases} == {True, False}
    assert {"--json-only" in c["flags"] for c in cases} == {True, False}

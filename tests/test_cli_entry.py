"""The console script's start-up, the optional dependencies and the CLI's progress output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import hesse.__main__ as entry_module
import hesse.cli
from hesse.cli import main

FAST = ["--model", "examples/models.py:make_net", "--data", "digits", "--analyses", "eigenvalues,trace",
        "--json-only", "--max-samples", "32", "--top-k", "2", "--budget", "6", "--tol", "1e-2", "--threads", "1"]


def _raise(error: BaseException):
    def fail(*args, **kwargs):
        raise error

    return fail


def test_interrupt_while_loading_the_command_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(entry_module.importlib, "import_module", _raise(KeyboardInterrupt()))
    monkeypatch.setattr(entry_module.os, "_exit", sys.exit)
    with pytest.raises(SystemExit) as caught:
        entry_module.entry()
    assert caught.value.code == 130
    assert capsys.readouterr().err == "hesse: interrupted while starting; nothing was written.\n"


def test_missing_click_names_the_cli_extra(monkeypatch, capsys):
    monkeypatch.setattr(entry_module.importlib, "import_module", _raise(ModuleNotFoundError("no", name="click")))
    with pytest.raises(SystemExit) as caught:
        entry_module.entry()
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "pip install 'hesse[cli]'" in err


def test_other_missing_modules_are_not_hidden(monkeypatch):
    monkeypatch.setattr(entry_module.importlib, "import_module", _raise(ModuleNotFoundError("x", name="numpy")))
    with pytest.raises(ModuleNotFoundError):
        entry_module.entry()


def test_missing_matplotlib_names_the_plot_extra(monkeypatch):
    from hesse.errors import HesseError
    from hesse.plotting import new_figure

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(HesseError, match=r"pip install 'hesse\[plot\]'"):
        new_figure((4, 3))


def test_import_hesse_has_no_optional_imports_and_report_plots_avoid_pyplot():
    code = (
        "import sys, hesse\n"
        "print([m for m in ('matplotlib', 'click', 'sklearn') if m in sys.modules])\n"
        "from hesse.report.plots import density_plot\n"
        "density_plot({'grid': [0.0, 1.0, 2.0], 'density': [0.1, 1.0, 0.1]}, [], log=True)\n"
        "print([m for m in ('matplotlib.pyplot',) if m in sys.modules], sys.modules['matplotlib'].get_backend())\n"
    )
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "MPLBACKEND": "module://no.such.backend"}).stdout
    assert lines.splitlines()[:2] == ["[]", "[] module://no.such.backend"]  # backend left alone


def _run_capturing_progress(monkeypatch, tmp_path, *args: str):
    seen = []
    real = hesse.cli.run_analyses

    def spy(op, settings, *, progress, on_start):
        seen.append(progress)
        return real(op, settings, progress=progress, on_start=on_start)

    monkeypatch.setattr(hesse.cli, "run_analyses", spy)
    result = CliRunner().invoke(main, ["analyze", *FAST, "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "report.json").read_text())["complete"]
    return seen, result.output


def test_stage_messages_without_a_terminal(monkeypatch, tmp_path):
    seen, output = _run_capturing_progress(monkeypatch, tmp_path)
    assert seen == [False]  # no bars in a log file
    assert "hesse: eigenvalues\n" in output and "hesse: trace\n" in output
    assert "\r" not in output


def test_bars_on_a_terminal(monkeypatch, tmp_path):
    monkeypatch.setattr(hesse.cli, "stderr_is_terminal", lambda: True)
    seen, _ = _run_capturing_progress(monkeypatch, tmp_path)
    assert seen == [True]


def test_no_progress_silences_bars_and_stage_messages(monkeypatch, tmp_path):
    monkeypatch.setattr(hesse.cli, "stderr_is_terminal", lambda: True)
    seen, output = _run_capturing_progress(monkeypatch, tmp_path, "--no-progress")
    assert seen == [False]
    assert "hesse:" not in output


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0])
def test_real_sigint_while_starting_is_one_line(tmp_path, delay):
    """A real Ctrl-C (SIGINT) while torch is being imported or the example trains: one line, status 130."""
    command = [sys.executable, "-m", "hesse", "analyze", "--example", "digits", "--out", str(tmp_path / "r"),
               "--max-samples", "32", "--json-only", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(hesse.cli.__file__).parents[1])})
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    lines = err.strip().splitlines()  # stage lines may come first when the signal lands after start-up
    assert "Traceback" not in err and all(line.startswith("hesse: ") for line in lines), err
    assert lines[-1].startswith("hesse: interrupted") and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_stage_lines_in_a_log_file(tmp_path):
    """With stderr redirected (not a terminal): one plain line per stage, no bars, no carriage returns."""
    command = [sys.executable, "-m", "hesse", "analyze", *FAST, "--lr", "0.1", "--analyses", "eigenvalues,stability",
               "--out", str(tmp_path / "r")]
    with open(tmp_path / "log.txt", "w") as log:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(Path(hesse.cli.__file__).parents[1])})
    err = (tmp_path / "log.txt").read_text()
    assert done.returncode == 0, err
    assert "\r" not in err and "\x1b" not in err and err.endswith("\n")
    lines = err.splitlines()
    assert all(line.startswith("hesse: ") for line in lines), lines
    assert lines == [
        "hesse: note: no --train-batch-size given; full-batch GD assumed (pass --train-batch-size B for SGD)",
        "hesse: checking the model and the loss on the first batch",
        lines[2],  # the operator's repr, then ": loss and gradient"
        "hesse: eigenvalues",
        "hesse: stability",
    ]
    assert lines[2].endswith(": loss and gradient")

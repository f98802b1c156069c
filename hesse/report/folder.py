"""Write the report folder atomically: all or nothing, and never over someone else's folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from hesse.errors import HesseError
from hesse.report.document import SCHEMA

REPORT_JSON = "report.json"
INDEX_HTML = "index.html"


def is_hesse_report(folder: Path) -> bool:
    """True if ``folder`` holds a ``report.json`` written by hesse (our marker)."""
    try:
        return json.loads((folder / REPORT_JSON).read_text(encoding="utf-8")).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def check_output_folder(folder: Path, overwrite: bool) -> None:
    """Refuse a target that exists, unless it is an empty folder or (with ``overwrite``) our report,
    and a target whose folder (or parent folder) cannot be written."""
    if not folder.exists():
        if not folder.parent.is_dir():
            raise HesseError(f"cannot write the report to {folder}: the folder {folder.parent} does not exist.")
        check_writable(folder.parent, folder)
        return
    if folder.is_dir() and not any(folder.iterdir()):
        check_writable(folder, folder)
        return
    if not folder.is_dir() or not is_hesse_report(folder):
        raise HesseError(
            f"{folder} exists and is not a hesse report; choose another --out folder "
            "(hesse only replaces folders holding its own report.json)."
        )
    if not overwrite:
        raise HesseError(f"{folder} already holds a hesse report; pass --overwrite to replace it.")
    check_writable(folder, folder)


def check_writable(directory: Path, target: Path) -> None:
    """Create and delete a probe file in ``directory`` (and its parent, where the report is staged
    and swapped in); refuse with one line naming the folder and the fix when that fails."""
    for place in dict.fromkeys((directory, target.parent)):
        try:
            handle, probe = tempfile.mkstemp(prefix=".hesse-probe-", dir=place)
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            raise HesseError(
                f"cannot write the report to {target}: the folder {place} is not writable "
                f"({error.strerror or error}); choose another --out folder or make {place} writable."
            ) from error


def _umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_report_folder(folder: Path, files: dict[str, str], overwrite: bool) -> None:
    """Write ``files`` (name -> text) into a temporary sibling folder, then swap it into place.

    Any error or Ctrl-C before the swap removes the temporary folder and leaves the
    target untouched; a replaced report is removed only after the new one is in place.
    """
    folder = folder.resolve()
    check_output_folder(folder, overwrite)
    try:
        _swap_in(folder, files)
    except OSError as error:
        raise HesseError(f"cannot write the report to {folder}: {error.strerror or error}.") from error


def _swap_in(folder: Path, files: dict[str, str]) -> None:
    """Write ``files`` into a staging sibling and rename it to ``folder``; undo on any error."""
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    retired: Path | None = None
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; give it normal permissions
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        if folder.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, retired / folder.name)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None and (retired / folder.name).exists() and not folder.exists():
            os.replace(retired / folder.name, folder)
        raise
    finally:
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)

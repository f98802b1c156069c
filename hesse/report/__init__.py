"""Interfaces layer: run analyses for the CLI and write ``report.json`` + ``index.html``."""

from hesse.report.analyses import ANALYSES, SPECTRAL_ANALYSES, AnalysisRun, AnalysisSettings, run_analyses
from hesse.report.document import SCHEMA, build_report, summary_rows
from hesse.report.folder import INDEX_HTML, REPORT_JSON, check_output_folder, write_report_folder
from hesse.report.page import render

__all__ = [
    "ANALYSES", "INDEX_HTML", "REPORT_JSON", "SCHEMA", "SPECTRAL_ANALYSES", "AnalysisRun", "AnalysisSettings",
    "build_report", "check_output_folder", "render", "run_analyses", "summary_rows", "write_report_folder",
]

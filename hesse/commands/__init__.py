"""Subcommands of the ``hesse`` command line, each registered in :mod:`hesse.cli`."""

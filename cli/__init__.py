"""The ``predgate`` command line (:mod:`cli.main`), above the offline jobs and the service."""

"""The command line front (``tfgraph`` → ``tfgraph.cli.main:main``): parsing, exit codes, ``--json``
and summaries over the library calls; no compile or run-time logic of its own."""

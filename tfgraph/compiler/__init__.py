"""Compile time: the driver (``driver.compile``) and its phases, options, pass manager, instruments,
verification, calibration, precision budget, pruning front, export, pipeline stages and the
compile-time placement report. Imports ``tfgraph.targets``, ``tfgraph.passes``, the bottom layer and
``tfgraph.deploy``; nothing under ``tfgraph.deploy`` imports this package (tests/test_layers.py)."""

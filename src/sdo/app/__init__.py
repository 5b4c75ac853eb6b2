"""The applications built on the ``sdo`` library: the ``sdo`` command, the demo, ``sdo bench``, fine-tuning runs,
task definitions, plots and checkpoints.

The arrow points one way: these modules import the library (``sdo.sampling``, ``sdo.gradients``, ...) and the
embedded zoo (``sdo.zoo``); the library never imports them (``tests/test_layers.py`` checks it).
"""

"""A run: its config, data, network, training loop, and what it will cost (the budget).

Importing this package adds the budget's limits on one run's size to RunConfig's rules
(``bncore.run.config.RUN_RULES``): the budget counts them on the network, which is built from the
config's classes, so the config cannot import the budget itself.
"""

from bncore.run import budget as budget

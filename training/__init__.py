"""spamlingo training side: data -> train -> evaluate -> export (one module per step)."""

import os

# OpenMP threads that spin while waiting turn a busy 2-core machine into a crawl: measured here, e5-small
# trained at 1.8 samples/s with 2 spinning threads beside one other process, 23 with passive waiting.
# Must be set before torch loads libgomp; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

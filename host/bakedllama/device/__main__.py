"""python -m bakedllama.device [--port 4321] [--core real|testing]: the simulated SoC for other
clients (what `make sim` runs). See bakedllama.device.sim."""

import sys

from bakedllama.device.sim import main

sys.exit(main())

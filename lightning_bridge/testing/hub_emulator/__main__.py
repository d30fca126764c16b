"""``python -m lightning_bridge.testing.hub_emulator serve --root DIR --port N``: see :func:`.cli.main`."""

import sys

from .cli import main

sys.exit(main())

"""``python -m device_agent --config agent.toml``."""

import sys

from fedmq.cli import main

sys.exit(main(["agent", *sys.argv[1:]]))

"""The fedmq aggregator service (pip install 'fedmq[aggregator]')."""

"""fedmq: federated learning for IoT fleets, native to MQTT."""

__version__ = "0.1.0"

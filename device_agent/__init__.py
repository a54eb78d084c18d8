"""fedmq device agent: trains on local data and publishes weight updates over MQTT (numpy only)."""

"""Exceptions raised by fedmq.

::

    FedmqError
    ├── DecodeError        a payload is not a valid fedmq v1 message (carries the reason)
    ├── ConfigError        a config file or option is wrong (says which key and what to do)
    ├── ProtocolError      an event is illegal in the current state (state is left unchanged)
    ├── BrokerError        a broker could not be started, reached or used
    └── AlreadyRunningError  another aggregator runs for the federation (this one refuses)

A bad update from the network is data, not a crash: the aggregator turns a ``DecodeError`` (or a
failed check) into a counted rejection reason and carries on.
"""

from __future__ import annotations


class FedmqError(Exception):
    """Base class of every fedmq error."""


class DecodeError(FedmqError):
    """A payload could not be decoded; ``reason`` is a short machine-readable rejection reason."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class ConfigError(FedmqError):
    """A configuration file or option is invalid."""


class ProtocolError(FedmqError):
    """An event arrived that the state machine does not allow in its current state."""


class BrokerError(FedmqError):
    """A broker could not be started or reached."""


class AlreadyRunningError(FedmqError):
    """Another aggregator is running for the federation: a second one refuses to start."""

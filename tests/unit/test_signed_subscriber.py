"""ModelSubscriber(trusted_keys=...): an app takes only models the federation's key signed."""

from __future__ import annotations

from test_signing import FED, KEY, OTHER, RUN, model, signed_chunked, signed_whole

from fedmq import codec, signing
from fedmq.config import BrokerConfig
from fedmq.memory_transport import MemoryTransport
from fedmq.subscriber import ModelSubscriber
from fedmq.topics import Topics
from fedmq.transport import Message

TOPICS = Topics(FED)


def _app(trusted: list[str]) -> ModelSubscriber:
    return ModelSubscriber(BrokerConfig(), FED, transport=MemoryTransport(),
                           trusted_keys=trusted)


def _feed(app: ModelSubscriber, topic: str, payload: bytes) -> None:
    app.transport.inbox.put(Message(topic, payload, qos=1))
    app.poll()


def test_a_verifying_app_refuses_forgeries_and_keeps_the_signed_model() -> None:
    app = _app([signing.public_text(KEY.public_key())])
    head, parts = signed_chunked(2)
    for i, part in enumerate(parts):
        _feed(app, TOPICS.model_part(i), part)
    _feed(app, TOPICS.model, head)
    assert app.latest is not None
    assert (app.latest.run, app.latest.version) == (RUN, 2)
    later = RUN + 10**6
    _feed(app, TOPICS.model, codec.encode(model(0, run=later)))
    _feed(app, TOPICS.model, codec.encode(signed_whole(0, run=later, signer=signing.Signer(OTHER))))
    _feed(app, TOPICS.model, codec.encode(signed_whole(1)))  # an older signed one: not newer
    assert (app.latest.run, app.latest.version) == (RUN, 2)
    assert dict(app.refused) == {"unsigned": 1, "untrusted_key": 1}
    assert app.rejected == 2
    _feed(app, TOPICS.model, codec.encode(signed_whole(0, run=later)))  # a new run, signed
    assert (app.latest.run, app.latest.version) == (later, 0)


def test_without_keys_an_app_takes_the_forgery() -> None:
    """Why the option exists: the same unsigned model with a later run replaces the model."""
    app = _app([])
    _feed(app, TOPICS.model, codec.encode(signed_whole(2)))
    _feed(app, TOPICS.model, codec.encode(model(0, run=RUN + 10**6)))
    assert app.latest is not None
    assert app.latest.run == RUN + 10**6

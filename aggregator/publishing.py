"""What the aggregator publishes: the retained model (whole or chunked), the retained round
announcement, round summaries, the federated evaluation of each version, the open round's
progress and a statistics federation's result; and the same retained state again after a
reconnect.

``Publisher`` holds only what publishing needs to remember (the retained payloads, how many model
parts the last split left, the current model's digest); the service decides when.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from aggregator.history import ModelHistory
from fedmq import codec
from fedmq.chunking import MIN_CHUNK_BYTES, split_model
from fedmq.compression import encode_all
from fedmq.config import AggregatorConfig, CompressionConfig
from fedmq.keys import load_signer
from fedmq.secagg.noise import announced
from fedmq.signing import manifest_of
from fedmq.statistics import query_of
from fedmq.topics import Topics
from fedmq.transport import Transport
from fedmq.wire import (
    GlobalModel,
    ModelEvaluation,
    RoundAnnouncement,
    RoundProgress,
    RoundSummary,
    StatisticsResult,
    model_digest,
)

__all__ = ["Publisher", "codec_params"]

def _device_noise(cfg: AggregatorConfig) -> dict[str, float]:
    """Secure aggregation with DP: the clip and each device's noise share (docs/privacy.md)."""
    p = cfg.privacy
    if not (p.secure_aggregation and p.noise_multiplier > 0 and p.clip_norm is not None):
        return {}
    return announced(p.noise_multiplier, p.clip_norm, cfg.rounds.min_updates)


log = logging.getLogger("aggregator.service")


def codec_params(c: CompressionConfig) -> dict[str, float | int | str]:
    """The options of the configured codec, as announced to devices."""
    if c.codec == "int8":
        return {"block": c.block}
    if c.codec == "topk":
        return {"fraction": c.fraction, "values": c.values, "block": c.block}
    return {}


class Publisher:
    """Publishes a federation's model, announcements and summaries on its topics."""

    def __init__(self, config: AggregatorConfig, transport: Transport, topics: Topics,
                 history: ModelHistory | None) -> None:
        self.config = config
        self.transport = transport
        self.topics = topics
        self.history = history
        #: The retained messages as last published (republished byte for byte on reconnect).
        self.retained: list[tuple[str, bytes]] = []
        #: Parts of the last chunked model (0: it went out whole).
        self.model_parts = 0
        #: SHA-256 of the current model, as announced.
        self.model_sha = ""
        #: A statistics federation's query, announced with every round (docs/analytics.md).
        self.query = query_of(config.task) if config.task.kind == "statistics" else ()
        #: Signs every model and announcement when ``[security] signing_key`` is set.
        key = config.security.signing_key
        self.signer = load_signer(key) if key else None
        if config.train.extra:  # said once: a misspelt [train] key is forwarded, not refused
            log.info("extra [train] keys, sent to the devices' trainers in every announcement: "
                     "%s", ", ".join(f"{k} = {v!r}" for k, v in config.train.extra.items()))

    def chunk_limit(self) -> int:
        """Largest message: ``max_chunk_bytes``, below the broker's Maximum Packet Size."""
        limit = self.config.compression.max_chunk_bytes
        broker = self.transport.max_packet_size
        return min(limit, broker - 1024) if broker else limit

    def model(self, weights: Mapping[str, npt.NDArray[np.float32]], *, version: int,
              round_: int, run: int, created: float, metrics: Mapping[str, float]) -> None:
        """Publish ``weights`` as model ``version`` (retained; chunked above the limit)."""
        tensors = encode_all(weights)
        self.model_sha = model_digest(tensors)
        model = GlobalModel(federation=self.config.federation, version=version, round=round_,
                            tensors=tensors, sha256=self.model_sha, metrics=dict(metrics),
                            created=created, run=run)
        if self.history is not None:
            self.history.save(model)  # the whole model, before it is split for the wire
        # Room for the signature, so that a signed whole model still fits the limit.
        room = len(codec.encode_manifest(manifest_of(model))) + 256 if self.signer else 0
        messages = split_model(model, max(MIN_CHUNK_BYTES, self.chunk_limit() - room))
        # Parts first, manifest last: a subscriber that sees the manifest has the parts coming.
        out = [(self.topics.model_part(m.chunk), codec.encode(m))
               for m in messages[1:] if m.chunk is not None]
        head = messages[0]
        if self.signer is not None:  # the manifest signs each part's payload (protocol.md 5b)
            head = self.signer.model(head, manifest_of(model, [p for _, p in out]))
        out.append((self.topics.model, codec.encode(head)))
        for stale in range(len(messages) - 1, self.model_parts):
            # Clear retained parts an earlier, larger split left behind.
            self.transport.publish(self.topics.model_part(stale), b"", qos=1, retain=True)
        self.model_parts = len(messages) - 1
        for topic, payload in out:
            self.transport.publish(topic, payload, qos=1, retain=True)
        # The model replaces the previous one's messages; the round and the metrics stay.
        keep = (self.topics.round, self.topics.model_eval, self.topics.progress,
                self.topics.result)
        self.retained = [r for r in self.retained if r[0] in keep] + out

    def announce(self, *, round_: int, version: int, run: int, deadline: float,
                 open_: bool = True, draw: int = 0) -> None:
        """Publish the round announcement (retained) for round ``round_`` on ``version``."""
        cfg = self.config
        r = cfg.rounds
        # In async mode a round is one buffer: it closes at buffer_size updates (max_updates).
        buffered = r.mode == "async"
        ann = RoundAnnouncement(
            federation=cfg.federation, round=round_, base_version=version,
            model_sha256=self.model_sha, deadline=deadline, min_updates=r.min_updates,
            max_updates=r.buffer_size if buffered else r.max_updates,
            mode=r.mode, max_staleness=r.max_staleness if buffered else 0,
            train={"epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
                   "lr": cfg.train.lr, "seed": cfg.train.seed,
                   # only when on: older agents would take it for an unknown extra key
                   **({"proximal_mu": cfg.train.proximal_mu} if cfg.train.proximal_mu else {}),
                   **cfg.train.extra,
                   # devices take part through secure aggregation (aggregator/secagg_service)
                   **({"secure_aggregation": 1} if cfg.privacy.secure_aggregation else {}),
                   # with DP too: each device's noise share (signed with the announcement)
                   **_device_noise(cfg)},
            sample_seed=cfg.sampling.seed, sample_rate=cfg.sampling.rate,
            codec=cfg.compression.codec, codec_params=codec_params(cfg.compression),
            max_chunk_bytes=self.chunk_limit(), open=open_, run=run,
            # Each extension below quorum redraws the sample (fedmq.sampling), but only when
            # there is a sample to redraw.
            sample_draw=draw if cfg.sampling.rate < 1.0 else 0,
            task=cfg.task.kind, columns=self.query)
        payload = codec.encode(self.signer.round(ann) if self.signer is not None else ann)
        self.transport.publish(self.topics.round, payload, qos=1, retain=True)
        self._retain(self.topics.round, payload)

    def summary(self, summary: RoundSummary) -> None:
        """Publish a closed round's summary on the metrics topic (not retained)."""
        self.transport.publish(self.topics.metrics, codec.encode(summary), qos=1)

    def model_eval(self, evaluation: ModelEvaluation) -> None:
        """Publish a version's federated evaluation (retained: a new dashboard gets the latest)
        and keep it beside that version in the history."""
        payload = codec.encode(evaluation)
        self.transport.publish(self.topics.model_eval, payload, qos=1, retain=True)
        self._retain(self.topics.model_eval, payload)
        if self.history is not None:
            try:
                self.history.save_eval(evaluation.version, evaluation.metrics)
            except OSError as exc:  # metrics only: the federation goes on
                log.warning("cannot store the evaluation of version %d in the history: %s",
                            evaluation.version, exc)

    def progress(self, progress: RoundProgress) -> None:
        """Publish the open round's progress (retained, QoS 0: a newer one follows soon)."""
        payload = codec.encode(progress)
        self.transport.publish(self.topics.progress, payload, qos=0, retain=True)
        self._retain(self.topics.progress, payload)

    def _retain(self, topic: str, payload: bytes) -> None:
        self.retained = [r for r in self.retained if r[0] != topic]
        self.retained.append((topic, payload))

    def result(self, result: StatisticsResult) -> None:
        """Publish a statistics round's result (retained: an app reads the latest at once)."""
        self.result_payload(codec.encode(result))

    def result_payload(self, payload: bytes) -> None:
        """Publish an encoded result as is (a recovered aggregator's last one, byte for byte)."""
        self.transport.publish(self.topics.result, payload, qos=1, retain=True)
        self._retain(self.topics.result, payload)

    def last_result(self) -> bytes | None:
        """The encoded result last published, if any (kept in snapshots)."""
        return next((p for t, p in self.retained if t == self.topics.result), None)

    def republish(self) -> None:
        """Publish the retained model and round again, byte for byte (receivers dedupe)."""
        for topic, payload in self.retained:
            self.transport.publish(topic, payload, qos=1, retain=True)

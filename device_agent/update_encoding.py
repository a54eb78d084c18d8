"""How a device turns its float32 delta into update messages: the announced codec (with error
feedback for the lossy ones) and chunks below the announced and the broker's size limits."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq import compression
from fedmq.chunking import place, split_update
from fedmq.wire import CODECS, TOPK_VALUES, ModelUpdate, RoundAnnouncement, Tensor

__all__ = ["codec_options", "encode_update"]

F32 = npt.NDArray[np.float32]


def encode_update(update: ModelUpdate, delta: dict[str, F32], ann: RoundAnnouncement,
                  feedback: compression.ErrorFeedback, max_packet_size: int | None
                  ) -> list[ModelUpdate]:
    """Compress ``delta`` as the announcement asks and cut it into chunks that fit.

    With a lossy codec the error-feedback residual is added first, and what the chunks
    really carry is subtracted back out and kept for the next round.
    """
    codec_name = ann.codec if ann.codec in CODECS else "fp32"
    opts = codec_options(ann.codec_params)
    lossy = codec_name != "fp32"
    intended = feedback.compensate(delta) if lossy else delta

    def encoder(name: str, values: F32) -> Tensor:
        return compression.encode(name, values, codec_name, **opts)

    whole = dataclasses.replace(update, tensors=tuple(
        dataclasses.replace(encoder(n, a.reshape(-1)), shape=a.shape)
        for n, a in intended.items()))
    limits = [x for x in (ann.max_chunk_bytes, max_packet_size) if x]
    messages = (split_update(whole, intended, encoder, min(limits)) if limits else [whole])
    if lossy:
        sent = place(((t, compression.decode_range(t)) for m in messages for t in m.tensors),
                     {n: a.shape for n, a in intended.items()})
        feedback.record(sent, intended)
        feedback.save()
    return messages


def codec_options(params: Mapping[str, float | int | str]) -> dict[str, Any]:
    """The encoder keyword arguments an announcement's ``codec_params`` name (others ignored)."""
    opts: dict[str, Any] = {}
    if isinstance(params.get("block"), int):
        opts["block"] = params["block"]
    if isinstance(params.get("fraction"), int | float):
        opts["fraction"] = float(params["fraction"])
    if params.get("values") in TOPK_VALUES:
        opts["values"] = params["values"]
    return opts

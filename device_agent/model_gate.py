"""The device's signature policy (docs/security.md, "Signed models"): ``gate_of`` builds the
``fedmq.signed_gate.SignedGate`` that ``[security] trusted_keys`` asks for. The policy lives in
agent.toml only: nothing received over the network turns it off."""

from __future__ import annotations

import logging
from pathlib import Path

from device_agent.accepted_record import load_accepted, save_accepted
from device_agent.agent import AgentMachine
from fedmq.config import AgentConfig
from fedmq.signed_gate import SLOTS, SignedGate
from fedmq.signing import Verifier, parse_public
from fedmq.wire import newer

__all__ = ["SLOTS", "SignedGate", "accepted_path", "gate_of", "raise_floor"]

log = logging.getLogger(__name__)


def gate_of(config: AgentConfig, device_id: str) -> SignedGate | None:
    """The check ``[security] trusted_keys`` asks for; without keys, None, and one line says
    that this device uses models and announcements unverified."""
    keys = config.security.trusted_keys
    if not keys:
        log.warning("device %s: models and round announcements are not verified (set "
                    "[security] trusted_keys, docs/security.md)", device_id)
        return None
    gate = SignedGate(Verifier([parse_public(k) for k in keys]))  # checked by load_agent
    record = load_accepted(accepted_path(config))
    if record is not None:  # what this device accepted before it restarted
        gate.floor_model, gate.floor_round = record
    return gate


def accepted_path(config: AgentConfig) -> Path | None:
    """Where a device that verifies keeps what it accepted (``device_agent.accepted_record``)."""
    state = config.device.state_dir
    return Path(state) / f"accepted-{config.federation}.json" if state else None


def raise_floor(gate: SignedGate, machine: AgentMachine, path: Path | None) -> None:
    """Raise ``gate``'s floor to the model and round ``machine`` now holds (both passed the
    gate), and keep it in ``path`` so a restarted device refuses what is older."""
    model = (machine.run, machine.model_version)
    ann = machine.announcement
    round_ = (ann.run, ann.round) if ann is not None else gate.floor_round
    if not (newer(*model, *gate.floor_model) or newer(*round_, *gate.floor_round)):
        return
    if newer(*model, *gate.floor_model):
        gate.floor_model = model
    if newer(*round_, *gate.floor_round):
        gate.floor_round = round_
    if path is None:
        return
    try:
        save_accepted(path, gate.floor_model, gate.floor_round)
    except OSError as exc:  # the check itself goes on; only the restart protection is weaker
        log.warning("device %s: cannot record the accepted model in %s: %s",
                    machine.device_id, path, exc)

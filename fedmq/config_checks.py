"""Configuration checks beyond one value: how a value is named and shown in an error (``[rounds]
min_updates = 3``), and which values can work together (strategy settings, privacy, the
statistics task, scale-out roles). ``fedmq.config`` runs them on every config it loads or is
given."""

from __future__ import annotations

import json
from typing import Any

from fedmq.config_schema import STRATEGY_DEFAULTS, AgentConfig, AggregatorConfig, StrategyConfig
from fedmq.errors import ConfigError
from fedmq.secagg.noise import ring_error

__all__ = ["at_most", "check_cluster", "check_device_task", "check_privacy",
           "check_secure_aggregation", "check_strategy", "check_task", "key_of", "show"]


def key_of(path: str) -> str:
    """``rounds.min_updates`` as the file spells it: ``[rounds] min_updates``."""
    section, _, key = path.rpartition(".")
    return f"[{section}] {key}" if section else key


def show(value: Any) -> str:
    """A value as TOML writes it, on one line, shortened past 60 characters."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value)
    elif isinstance(value, float):
        text = repr(value)  # nan, inf, -inf: TOML's spelling too
    elif isinstance(value, list):
        text = "[" + ", ".join(show(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k} = {show(v)}" for k, v in value.items()) + "}"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def at_most(lo_key: str, lo: float, hi_key: str, hi: float) -> None:
    if lo > hi:
        raise ConfigError(f"{key_of(lo_key)} = {show(lo)} must be <= {key_of(hi_key)} = {show(hi)}")


def check_cluster(cfg: AggregatorConfig) -> None:
    """A role's needs (docs/scaling.md): workers know who they are, the coordinator whom it
    waits for; what the scale-out does not do yet is refused, not half done."""
    c = cfg.cluster
    if c.role == "single":
        return
    head = f'[cluster] role = "{c.role}"'
    if c.role == "worker":
        if not c.name:
            raise ConfigError(f"{head} needs [cluster] name, this worker's name")
        if c.shards and c.shard >= c.shards:
            at_most("cluster.shard", c.shard, "cluster.shards", c.shards - 1)
    elif not c.workers:
        raise ConfigError(f"{head} needs [cluster] workers, the names of every worker")
    for what, bad in (('[rounds] mode = "async"', cfg.rounds.mode != "sync"),
                      ('[task] kind = "statistics"', cfg.task.kind != "train"),
                      ("[privacy] secure_aggregation", cfg.privacy.secure_aggregation),
                      ("[privacy] noise_multiplier > 0", cfg.privacy.noise_multiplier > 0)):
        if bad:
            raise ConfigError(f"{head} does not support {what} yet (docs/scaling.md); run "
                              'it with [cluster] role = "single"')


def check_strategy(s: StrategyConfig) -> None:
    """A setting the named strategy does not use is a mistake (momentum without fedavgm, say)."""
    for key in ("server_lr", "momentum", "beta1", "beta2", "tau"):
        value = getattr(s, key)
        if value is not None and key not in STRATEGY_DEFAULTS[s.name]:
            users = [f'"{n}"' for n, keys in STRATEGY_DEFAULTS.items() if key in keys]
            names = users[0] if len(users) == 1 else f"{', '.join(users[:-1])} or {users[-1]}"
            raise ConfigError(f"[strategy] {key} = {show(value)} only applies with [strategy] "
                              f'name = {names} (it is "{s.name}")')


def check_privacy(cfg: AggregatorConfig) -> None:
    """Differential privacy's keys agree with the rest (docs/privacy.md): one clip, bounded."""
    p = cfg.privacy
    if p.secure_aggregation:
        check_secure_aggregation(cfg)
    if p.noise_multiplier == 0:
        for key in ("clip_norm", "target_epsilon"):
            if (value := getattr(p, key)) is not None:
                raise ConfigError(f"[privacy] {key} = {show(value)} only applies with "
                                  "[privacy] noise_multiplier > 0 (it is 0: no DP)")
        return
    head = f"[privacy] noise_multiplier = {show(p.noise_multiplier)}"
    if p.clip_norm is None:
        raise ConfigError(f"{head} needs [privacy] clip_norm, the L2 bound each update's delta "
                          "is clipped to")
    r = cfg.robust
    if r.clip_norm is not None and r.clip_norm != p.clip_norm:
        raise ConfigError(f"[robust] clip_norm = {show(r.clip_norm)} contradicts [privacy] "
                          f"clip_norm = {show(p.clip_norm)}: with noise the privacy clip is "
                          "the norm bound; remove [robust] clip_norm")
    if r.mode == "off":
        raise ConfigError(f'{head} needs the norm bound: [robust] mode = "off" leaves the '
                          "updates unclipped")
    at_most("privacy.clip_norm", p.clip_norm, "robust.max_norm", r.max_norm)
    _sync_training_only(cfg, head)
    if p.secure_aggregation and (why := ring_error(p.noise_multiplier, p.clip_norm,
                                                    cfg.rounds.min_updates,
                                                    cfg.rounds.max_updates)):
        raise ConfigError(f"{head} with secure aggregation: {why}; lower [rounds] max_updates")
    if cfg.sampling.rate == 0:
        raise ConfigError(f"{head} needs [sampling] rate > 0 (0: no device ever trains)")


def _sync_training_only(cfg: AggregatorConfig, head: str) -> None:
    """``head`` (a privacy setting) needs synchronous rounds of a training task."""
    if cfg.rounds.mode != "sync":
        raise ConfigError(f'{head} works with [rounds] mode = "sync" only (it is '
                          f'"{cfg.rounds.mode}")')
    if cfg.task.kind != "train":
        raise ConfigError(f'{head} applies to [task] kind = "train" only (it is '
                          f'"{cfg.task.kind}")')


def check_secure_aggregation(cfg: AggregatorConfig) -> None:
    """Secure aggregation's needs (docs/security.md): synchronous training rounds of 2+."""
    head = "[privacy] secure_aggregation = true"
    _sync_training_only(cfg, head)
    if cfg.rounds.min_updates < 2:
        raise ConfigError(f"{head} needs [rounds] min_updates >= 2 (it is "
                          f"{cfg.rounds.min_updates}): the sum of one device is its update")


def _only_with_statistics(section: str, keys: dict[str, Any]) -> None:
    for key, value in keys.items():
        if value:
            raise ConfigError(f"[{section}] {key} = {show(value)} only applies with "
                              f'[{section}] kind = "statistics" (it is "train")')


def check_task(cfg: AggregatorConfig) -> None:
    """A statistics query that can be announced: every column has bins, and a contribution
    fits in one message (contributions are never chunked)."""
    t = cfg.task
    if t.kind == "train":
        _only_with_statistics("task", {"columns": t.columns, "bins": t.bins, "edges": t.edges,
                                       "column_bins": t.column_bins})
        return
    if not t.columns:
        raise ConfigError('[task] kind = "statistics" needs [task] columns = ["name", ...]')
    if t.bins is not None and t.edges is not None:
        raise ConfigError("[task] bins and [task] edges are two ways to give the same bins: "
                          "set one")
    unknown = sorted(set(t.column_bins) - set(t.columns))
    if unknown:
        raise ConfigError(f"[task.column_bins] {unknown[0]} is not one of [task] columns")
    if t.bins is None and t.edges is None:
        missing = [c for c in t.columns if c not in t.column_bins]
        if missing:
            raise ConfigError(f"[task] column {missing[0]!r} has no bins: set [task] bins = "
                              "[lo, hi, nbins] (or edges) for every column, or "
                              f"[task.column_bins] {missing[0]} = [lo, hi, nbins]")
    from fedmq.statistics import contribution_bytes, query_of

    try:
        query = query_of(t)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    size = contribution_bytes(query)
    limit = min(cfg.compression.max_chunk_bytes, cfg.limits.max_update_bytes)
    if size > limit:
        raise ConfigError(f"[task] a contribution to {len(query)} columns with these bins is "
                          f"about {size} bytes, above [compression] max_chunk_bytes = {limit}: "
                          "fewer bins or columns (contributions are never chunked)")


def check_device_task(cfg: AgentConfig) -> None:
    t = cfg.task
    if t.kind == "train":
        _only_with_statistics("task", {"columns": t.columns, "statistics": t.statistics})
    elif t.statistics is None and cfg.data.source != "npz":
        raise ConfigError('[task] kind = "statistics" summarizes the arrays of an .npz file '
                          '([data] source = "npz", [data] path) or what [task] statistics = '
                          '"package.module:function" returns: set one')

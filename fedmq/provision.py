"""``fedmq provision``: per-device identities, the ACL and the broker config for one federation.

Writes, under ``--out DIR`` (layout in docs/operations.md, "Provisioning"):

- ``ca/``: a CA (``ca.key`` 0600: keep it offline once done) that signs the broker's TLS
  certificate and, with ``--mode cert``, one client certificate per identity;
- ``broker/``: ``mosquitto.conf`` (the shipped ``production.conf`` with its paths pointed
  here, the listener on ``--broker-port`` and, in cert mode, ``require_certificate`` /
  ``use_identity_as_username`` / ``crlfile`` on), ``acl`` (``fedmq.acl``), ``passwd``
  (password mode) or ``certs/crl.pem`` (cert mode), ``certs/``;
- ``aggregator/aggregator.toml``, ``devices/<id>/agent.toml``, ``operators/<name>/broker.toml``,
  ``apps/<name>/broker.toml``: each identity's config with its credentials, ``ca.crt`` and,
  in cert mode, ``client.crt`` / ``client.key``.

Private keys and files holding a password are 0600. Running it again on the same directory
keeps every existing credential and adds what is missing (more ``--devices``, a new
``--operator``); ``--rotate ID`` replaces one identity's credentials and ``--revoke ID``
removes one for good. The ACL, the password file, the CRL and ``mosquitto.conf`` are rewritten
from ``provision.json`` (no secrets in it) each time. Another federation or mode in an existing
directory is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedmq import pki
from fedmq.acl import render_acl
from fedmq.errors import ConfigError
from fedmq.pki import ProvisionError
from fedmq.topics import check_name

__all__ = ["Manifest", "ProvisionError", "Request", "add_arguments", "provision", "run"]

MANIFEST = "provision.json"
Mode = Literal["password", "cert"]
Role = Literal["aggregator", "operator", "app", "device"]
_ROLE_DIRS: dict[Role, str] = {"aggregator": "aggregator", "operator": "operators",
                               "app": "apps", "device": "devices"}
_CONFIG_FILE: dict[Role, str] = {"aggregator": "aggregator.toml", "operator": "broker.toml",
                                 "app": "broker.toml", "device": "agent.toml"}
CA_DAYS = 3650


@dataclass
class Request:
    """What one run is asked to do (the command's options)."""

    federation: str
    devices: int
    out: Path
    mode: Mode = "password"
    #: None: what the directory was provisioned with, else localhost:8883.
    broker_host: str | None = None
    broker_port: int | None = None
    san: Sequence[str] = ()
    device_prefix: str | None = None
    aggregator: str | None = None
    operators: Sequence[str] | None = None
    apps: Sequence[str] = ()
    agent_template: Path | None = None
    aggregator_template: Path | None = None
    broker_dir: Path | None = None
    device_dir: str | None = None
    days: int = 825
    rotate: Sequence[str] = ()
    revoke: Sequence[str] = ()
    passwd_tool: str | None = None


@dataclass
class Manifest:
    """``provision.json``: who exists, and the certificate serials (never a secret)."""

    federation: str
    mode: Mode
    broker_host: str
    broker_port: int
    aggregator: str
    device_prefix: str
    devices: int = 0
    operators: list[str] = field(default_factory=list)
    apps: list[str] = field(default_factory=list)
    serials: dict[str, int] = field(default_factory=dict)
    revoked: list[str] = field(default_factory=list)
    revoked_serials: list[int] = field(default_factory=list)

    def device_ids(self) -> list[str]:
        ids = [f"{self.device_prefix}{i:04d}" for i in range(1, self.devices + 1)]
        return [i for i in ids if i not in self.revoked]

    def identities(self) -> list[tuple[str, Role]]:
        out: list[tuple[str, Role]] = [(self.aggregator, "aggregator")]
        out += [(n, "operator") for n in self.operators]
        out += [(n, "app") for n in self.apps]
        return out + [(d, "device") for d in self.device_ids()]


# --- TOML ------------------------------------------------------------------------------------


def _toml_value(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # inf and nan are spelled the same in TOML
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list) and not any(isinstance(v, dict) for v in value):
        return "[" + ", ".join(_toml_value(v, key) for v in value) + "]"
    raise ProvisionError(f"template key {key!r}: value {value!r} cannot be copied")


def dump_toml(data: Mapping[str, Any], header: str = "") -> str:
    """TOML for ``data``: scalars, lists of scalars and nested tables (all a config uses)."""
    lines = [header] if header else []

    def table(prefix: str, items: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in items.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"\n[{prefix}]")
        lines.extend(f"{k} = {_toml_value(v, k)}" for k, v in scalars.items())
        for k, v in items.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(lines) + "\n"


def _template(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(" ".join(f"{path}: {exc}".splitlines())) from None


# --- the run ---------------------------------------------------------------------------------


def _load_manifest(out: Path) -> Manifest | None:
    path = out / MANIFEST
    if not path.exists():
        if out.exists() and any(out.iterdir()):
            raise ProvisionError(f"{out} exists, is not empty and has no {MANIFEST}: not a "
                                 "directory fedmq provision wrote; choose another --out")
        return None
    return Manifest(**json.loads(path.read_text(encoding="utf-8")))


def _merge(req: Request, old: Manifest | None) -> Manifest:
    fed = check_name(req.federation, "federation")
    if old is not None:
        for what, was, now in (("federation", old.federation, fed), ("mode", old.mode, req.mode)):
            if was != now:
                raise ProvisionError(f"{req.out} was provisioned with {what} {was!r}, not "
                                     f"{now!r}: use another --out")
        man = dataclasses.replace(old, broker_host=req.broker_host or old.broker_host,
                                  broker_port=req.broker_port or old.broker_port)
        if req.aggregator not in (None, old.aggregator) or req.device_prefix not in (
                None, old.device_prefix) or req.broker_host not in (None, old.broker_host) or \
                req.broker_port not in (None, old.broker_port):
            raise ProvisionError(f"{req.out}: the aggregator's username, the device prefix and "
                                 "the broker's host and port cannot change once provisioned "
                                 "(the configs written hold them): use another --out")
    else:
        prefix = req.device_prefix if req.device_prefix is not None else f"{fed}-"
        man = Manifest(federation=fed, mode=req.mode, broker_host=req.broker_host or "localhost",
                       broker_port=req.broker_port or 8883,
                       aggregator=req.aggregator or f"{fed}-aggregator", device_prefix=prefix)
    man.devices = max(man.devices, req.devices)
    operators = [f"{fed}-operator"] if req.operators is None and old is None else (
        req.operators or [])
    man.operators += [n for n in operators if n not in man.operators]
    man.apps += [n for n in req.apps if n not in man.apps]
    for name, _ in man.identities():
        check_name(name, "username")
    known = {name for name, _ in man.identities()}
    for name in [*req.rotate, *req.revoke]:
        if name not in known:
            raise ProvisionError(f"--rotate/--revoke {name!r}: no such identity in {req.out}")
    if man.aggregator in req.revoke:
        raise ProvisionError("the aggregator cannot be revoked: --rotate it instead")
    return man


def _write_config(path: Path, data: Mapping[str, Any], header: str, secret: bool) -> None:
    text = dump_toml(data, header).encode()
    if secret:
        pki.write_private(path, text)
    else:
        path.write_bytes(text)


class _Run:
    def __init__(self, req: Request, man: Manifest) -> None:
        self.req, self.man = req, man
        self.out = req.out.resolve()
        self.broker_dir = (req.broker_dir or self.out / "broker").as_posix().rstrip("/")
        self.certs = self.out / "broker" / "certs"
        self.passwd_path = self.out / "broker" / "passwd"
        self.passwd = self._read_passwd()

    def _read_passwd(self) -> dict[str, str]:
        if not self.passwd_path.exists():
            return {}
        lines = self.passwd_path.read_text(encoding="utf-8").splitlines()
        return {line.split(":", 1)[0]: line for line in lines if ":" in line}

    def ca(self) -> pki.Issued:
        ca_dir = self.out / "ca"
        key, cert = ca_dir / "ca.key", ca_dir / "ca.crt"
        if key.exists() and cert.exists():
            return pki.load_ca(key, cert)
        ca_dir.mkdir(parents=True, exist_ok=True)
        issued = pki.issue_ca(f"fedmq-{self.man.federation}-ca", CA_DAYS)
        issued.write(key, cert)
        return issued

    def server(self, ca: pki.Issued) -> None:
        self.certs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.out / "ca" / "ca.crt", self.certs / "ca.crt")
        if (self.certs / "server.crt").exists():
            return  # to re-issue (new names), delete server.crt and run again
        names = list(dict.fromkeys([self.man.broker_host, *self.req.san]))
        pki.issue_certificate(ca, self.man.broker_host, self.req.days, server_names=names).write(
            self.certs / "server.key", self.certs / "server.crt")

    def identity(self, ca: pki.Issued, name: str, role: Role) -> None:
        folder = self.out / _ROLE_DIRS[role] / name
        config = folder / _CONFIG_FILE[role]
        rotate = name in self.req.rotate
        if config.exists() and not rotate:
            return
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.out / "ca" / "ca.crt", folder / "ca.crt")
        here = self._identity_path(name, role)
        broker: dict[str, Any] = {"host": self.man.broker_host, "port": self.man.broker_port,
                                  "tls": True, "ca_file": f"{here}/ca.crt"}
        if self.man.mode == "password":
            password = pki.new_password()
            self.passwd[name] = pki.password_line(name, password, self.req.passwd_tool)
            broker |= {"username": name, "password": password}
        else:
            if name in self.man.serials:  # rotation: the old certificate goes on the CRL
                self.man.revoked_serials.append(self.man.serials[name])
            issued = pki.issue_certificate(ca, name, self.req.days)
            issued.write(folder / "client.key", folder / "client.crt")
            self.man.serials[name] = issued.serial
            broker |= {"cert_file": f"{here}/client.crt", "key_file": f"{here}/client.key"}
        self._write_identity_config(config, name, role, broker)

    def _identity_path(self, name: str, role: Role) -> str:
        if role == "device" and self.req.device_dir is not None:
            return self.req.device_dir.replace("{id}", name).rstrip("/")
        return (self.out / _ROLE_DIRS[role] / name).as_posix()

    def _write_identity_config(self, path: Path, name: str, role: Role,
                               broker: dict[str, Any]) -> None:
        header = (f"# {role} {name!r} of federation {self.man.federation!r}: written by fedmq "
                  "provision.\n# It holds this identity's credentials: keep it private.")
        if role in ("operator", "app"):
            _write_config(path, {"broker": broker}, header, secret=True)
            return
        template_path = self.req.agent_template if role == "device" else \
            self.req.aggregator_template
        data = _template(template_path)
        data["federation"] = self.man.federation
        data["broker"] = {k: v for k, v in data.get("broker", {}).items()
                          if k not in ("username", "password", "cert_file", "key_file",
                                       "client_id")} | broker
        if role == "device":
            device = {k: v for k, v in data.get("device", {}).items() if k != "id_from_env"}
            data["device"] = device | {"id": name}
        ordered = {"federation": data.pop("federation"), **data}
        _write_config(path, ordered, header, secret=True)

    def revoke(self, name: str, role: Role) -> None:
        self.passwd.pop(name, None)
        if name in self.man.serials:
            self.man.revoked_serials.append(self.man.serials.pop(name))
        shutil.rmtree(self.out / _ROLE_DIRS[role] / name, ignore_errors=True)
        if role == "device":
            self.man.revoked.append(name)
        elif role == "operator":
            self.man.operators.remove(name)
        else:
            self.man.apps.remove(name)

    def broker_files(self, ca: pki.Issued) -> None:
        man = self.man
        acl = render_acl(man.federation, aggregator=man.aggregator, devices=man.device_ids(),
                         operators=man.operators, apps=man.apps)
        (self.out / "broker" / "acl").write_text(acl, encoding="utf-8")
        if man.mode == "password":
            active = {name for name, _ in man.identities()}
            lines = [line for name, line in self.passwd.items() if name in active]
            pki.write_private(self.passwd_path, ("\n".join(lines) + "\n").encode())
        else:
            pki.write_crl(ca, man.revoked_serials, self.certs / "crl.pem", self.req.days)
        (self.out / "broker" / "data").mkdir(exist_ok=True)
        conf = render_broker_config(man.mode, man.broker_port, self.broker_dir)
        (self.out / "broker" / "mosquitto.conf").write_text(conf, encoding="utf-8")


def _swap(text: str, old: str, new: str) -> str:
    if old not in text:
        raise ProvisionError(f"production.conf no longer contains {old!r}: update "
                             "fedmq/provision.py")
    return text.replace(old, new)


def render_broker_config(mode: Mode, port: int, broker_dir: str) -> str:
    """The shipped production.conf with its paths under ``broker_dir``, the listener on
    ``port`` and, in cert mode, client certificates required and the CRL checked."""
    from fedmq.broker import broker_config_path

    text = broker_config_path("production").read_text(encoding="utf-8")
    text = _swap(text, "listener 8883 0.0.0.0", f"listener {port} 0.0.0.0")
    text = _swap(text, "/etc/mosquitto/fedmq/", f"{broker_dir}/")
    text = _swap(text, "persistence_location /var/lib/mosquitto/",
                 f"persistence_location {broker_dir}/data/")
    if mode == "cert":
        text = _swap(text, "#require_certificate true", "require_certificate true")
        text = _swap(text, "#use_identity_as_username true",
                     "use_identity_as_username true\n# Revoked certificates (fedmq provision "
                     "--revoke / --rotate); kill -HUP re-reads it (2.0.11, measured).\n"
                     f"crlfile {broker_dir}/certs/crl.pem")
        text = _swap(text, f"password_file {broker_dir}/passwd",
                     "# No password_file: the certificate is the credential.")
    header = (f"# Written by `fedmq provision` ({mode} mode) from fedmq's production.conf.\n")
    return header + text


def provision(req: Request) -> Manifest:
    """Create or update the files under ``req.out``; return the manifest written."""
    if req.devices < 0 or req.days < 1 or not 0 < (req.broker_port or 8883) < 65536:
        raise ProvisionError("--devices must be >= 0, --days >= 1, --broker-port 1..65535")
    old = _load_manifest(req.out)
    try:
        man = _merge(req, old)
    except ValueError as exc:  # a name that cannot be a topic level
        raise ProvisionError(str(exc)) from None
    req.out.mkdir(parents=True, exist_ok=True)
    os.chmod(req.out, 0o700)  # it holds every secret of the fleet
    run = _Run(req, man)
    ca = run.ca()
    run.server(ca)
    roles = dict(man.identities())
    for name in req.revoke:
        run.revoke(name, roles[name])
    for name, role in man.identities():
        run.identity(ca, name, role)
    run.broker_files(ca)
    (req.out / MANIFEST).write_text(json.dumps(dataclasses.asdict(man), indent=1) + "\n",
                                    encoding="utf-8")
    return man


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fedmq provision``."""
    p.add_argument("--federation", required=True, help="the federation's name")
    p.add_argument("--devices", type=int, required=True, metavar="N",
                   help="devices to provision (ids PREFIX0001..PREFIXN); a larger N later adds "
                        "devices")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="where to write (created 0700; run again on it to add or rotate)")
    p.add_argument("--mode", choices=("password", "cert"), default="password",
                   help="password: a Mosquitto password per identity; cert: a client "
                        "certificate per identity, its CN the username (default %(default)s)")
    p.add_argument("--broker-host", default=None,
                   help="the name clients connect to; in the broker's certificate "
                        "(default: as provisioned before, else localhost)")
    p.add_argument("--broker-port", type=int, default=None,
                   help="default: as provisioned before, else 8883")
    p.add_argument("--san", action="append", default=[], metavar="NAME",
                   help="another DNS name or IP address for the broker's certificate")
    p.add_argument("--device-prefix", default=None,
                   help="device ids are PREFIX0001...; default 'FEDERATION-'")
    p.add_argument("--aggregator", default=None, metavar="USER",
                   help="the aggregator's username (default FEDERATION-aggregator)")
    p.add_argument("--operator", action="append", default=None, metavar="USER",
                   help="a read-only operator identity (fedmq watch, round summaries with "
                        "device ids); default FEDERATION-operator on the first run")
    p.add_argument("--app", action="append", default=[], metavar="USER",
                   help="a read-only app identity: model and counts, no device ids")
    p.add_argument("--agent-template", type=Path, default=None, metavar="TOML",
                   help="an agent.toml whose other sections ([data], [trainer], ...) every "
                        "device's config copies")
    p.add_argument("--aggregator-template", type=Path, default=None, metavar="TOML",
                   help="likewise for aggregator.toml ([model], [rounds], ...)")
    p.add_argument("--broker-dir", type=Path, default=None, metavar="DIR",
                   help="where the broker/ files will be on the broker's machine (the paths "
                        "in mosquitto.conf; default: OUT/broker)")
    p.add_argument("--device-dir", default=None, metavar="DIR",
                   help="where a device's files will be on the device ('{id}' is replaced; "
                        "default: OUT/devices/ID)")
    p.add_argument("--days", type=int, default=825,
                   help="validity of certificates and of the CRL (default %(default)s)")
    p.add_argument("--rotate", action="append", default=[], metavar="ID",
                   help="new credentials for this identity (the old certificate is revoked)")
    p.add_argument("--revoke", action="append", default=[], metavar="ID",
                   help="remove this identity for good (password, ACL, certificate on the CRL)")


def run(args: argparse.Namespace) -> int:
    """``fedmq provision``: write the files, print what goes where."""
    req = Request(
        federation=args.federation, devices=args.devices, out=args.out, mode=args.mode,
        broker_host=args.broker_host, broker_port=args.broker_port, san=args.san,
        device_prefix=args.device_prefix, aggregator=args.aggregator, operators=args.operator,
        apps=args.app, agent_template=args.agent_template,
        aggregator_template=args.aggregator_template, broker_dir=args.broker_dir,
        device_dir=args.device_dir, days=args.days, rotate=args.rotate, revoke=args.revoke,
        passwd_tool=pki.mosquitto_passwd_binary() if args.mode == "password" else None)
    man = provision(req)
    out = args.out
    print(f"federation {man.federation!r} ({man.mode} mode) in {out}: "
          f"{len(man.device_ids())} devices, aggregator {man.aggregator!r}, "
          f"operators {man.operators}, apps {man.apps}, revoked {man.revoked}")
    print(f"  broker:     mosquitto -c {out / 'broker' / 'mosquitto.conf'}"
          "   (kill -HUP it after a change)")
    print(f"  aggregator: fedmq aggregator --config {out / 'aggregator' / man.aggregator}"
          "/aggregator.toml")
    print(f"  device:     fedmq agent --config {out / 'devices'}/<id>/agent.toml")
    return 0

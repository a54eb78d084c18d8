"""``fedmq provision`` and the ACL it writes, without a broker
(tests/integration/test_production_identity.py runs them on Mosquitto)."""

from __future__ import annotations

import re
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedmq import pki
from fedmq.acl import render_acl
from fedmq.broker import default_config_dir
from fedmq.cli import main
from fedmq.config import load_agent, load_aggregator
from fedmq.provision import Request, dump_toml, provision

FED = "digits"


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


def test_shipped_acl_template_is_what_render_acl_writes() -> None:
    template = (default_config_dir() / "acl.template").read_text(encoding="utf-8")
    body = render_acl("FEDERATION", aggregator="aggregator", devices=["DEVICE-ID"],
                      operators=["operator"], apps=["app-dashboard"]).split("\n\n", 1)[1]
    assert template.endswith(body)


def test_acl_names_the_federation_and_gives_devices_only_their_own_topics() -> None:
    acl = render_acl(FED, aggregator="agg", devices=["d1", "d2"], operators=["op"],
                     apps=["app"])
    assert "pattern" not in acl
    blocks: dict[str, list[str]] = {}
    for line in acl.splitlines():
        if line.startswith("user "):
            user = line.split()[1]
            blocks[user] = []
        elif line.startswith("topic "):
            blocks[user].append(line)
    for user, lines in blocks.items():
        for line in lines:
            _, _access, topic = line.split()
            assert topic.startswith(f"fedmq/v1/{FED}/"), (user, line)  # never a `+` federation
    base = f"fedmq/v1/{FED}"
    assert [ln.split()[2] for ln in blocks["d1"] if " write " in ln] == [
        f"{base}/update/d1", f"{base}/status/d1", f"{base}/eval/d1", f"{base}/secagg/keys/d1",
        f"{base}/secagg/shares/d1", f"{base}/secagg/masked/d1", f"{base}/secagg/reveal/d1"]
    assert [ln.split()[2] for ln in blocks["d1"] if " read " in ln] == [
        f"{base}/round", f"{base}/model", f"{base}/model/part/+", f"{base}/secagg/roster",
        f"{base}/secagg/unmask", f"{base}/secagg/deliver/d1"]
    for reader in ("op", "app"):
        assert all(" read " in ln for ln in blocks[reader])
    # Round summaries (device and update ids), results and the roster: operators only.
    for private in ("metrics", "result", "status/+"):
        topic = f"fedmq/v1/{FED}/{private}"
        assert f"topic read {topic}" in blocks["op"]
        assert not any(ln.endswith(f" {topic}") for ln in blocks["app"] + blocks["d1"])
    with pytest.raises(ValueError, match="more than one identity"):
        render_acl(FED, aggregator="x", devices=["x"])


def test_hash_matches_mosquitto_passwd() -> None:
    tool = pki.mosquitto_passwd_binary()
    if tool is None:
        pytest.skip("mosquitto_passwd not installed")
    line = pki.password_line("alice", "s3cret", tool)
    assert line.split(":", 1)[1].startswith(f"$7${pki.MOSQUITTO_PBKDF2_ITERATIONS}$")
    assert pki.verify_password_line(line, "alice", "s3cret")
    assert not pki.verify_password_line(line, "alice", "s3cret!")
    assert pki.verify_password_line(pki.password_line("bob", "pw", None), "bob", "pw")


@pytest.mark.parametrize("mode", ["password", "cert"])
def test_provision_writes_private_files_and_working_configs(tmp_path: Path, mode: str) -> None:
    template = tmp_path / "t.toml"
    template.write_text('[data]\nnum_shards = 2\n[device]\nid_from_env = "HOSTNAME"\n'
                        '[broker]\nkeepalive = 20\nusername = "ignored"\n')
    out = tmp_path / "fleet"
    provision(Request(federation=FED, devices=2, out=out, mode=mode,  # type: ignore[arg-type]
                      agent_template=template, passwd_tool=None))
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for path in out.rglob("*"):
        secret = path.suffix in (".key", ".toml") or path.name == "passwd"
        if path.is_file() and secret:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    agent = load_agent(out / "devices" / f"{FED}-0002" / "agent.toml")
    assert (agent.federation, agent.device_id(), agent.data.num_shards) == (FED, f"{FED}-0002", 2)
    assert (agent.broker.tls, agent.broker.keepalive, agent.device.id_from_env) == (True, 20, None)
    aggregator = load_aggregator(out / "aggregator" / f"{FED}-aggregator" / "aggregator.toml")
    assert aggregator.federation == FED
    conf = (out / "broker" / "mosquitto.conf").read_text()
    assert re.search(r"^listener 8883 0\.0\.0\.0$", conf, re.MULTILINE)
    assert f"acl_file {out.resolve()}/broker/acl" in conf
    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "broker" / "certs" / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    assert server.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["localhost"]
    if mode == "password":
        assert agent.broker.username == f"{FED}-0002"
        assert agent.broker.cert_file is None
        lines = (out / "broker" / "passwd").read_text().splitlines()
        assert len(lines) == 4  # aggregator, operator, two devices
        assert agent.broker.password is not None
        assert any(pki.verify_password_line(ln, f"{FED}-0002", agent.broker.password)
                   for ln in lines)
        assert "require_certificate true" not in conf.replace("#require", "")
    else:
        assert agent.broker.username is None
        assert agent.broker.password is None
        assert agent.broker.cert_file is not None
        cert = x509.load_pem_x509_certificate(Path(agent.broker.cert_file).read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.rfc4514_string() == f"CN={FED}-0002"
        assert "\nrequire_certificate true\nuse_identity_as_username true\n" in conf
        assert "\npassword_file" not in conf
        crl = x509.load_pem_x509_crl((out / "broker" / "certs" / "crl.pem").read_bytes())
        ca_key = ca.public_key()
        assert isinstance(ca_key, ec.EllipticCurvePublicKey)
        assert crl.is_signature_valid(ca_key)
        assert len(crl) == 0


def test_running_again_keeps_credentials_and_adds_devices(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    provision(Request(federation=FED, devices=2, out=out, mode="cert"))
    first = _files(out)
    provision(Request(federation=FED, devices=2, out=out, mode="cert"))
    again = _files(out)
    changed = {name for name in first if first[name] != again[name]}
    assert changed <= {"broker/certs/crl.pem"}  # re-signed with a new date, same content
    provision(Request(federation=FED, devices=3, out=out, mode="cert"))
    grown = _files(out)
    assert all(grown[n] == first[n] for n in first if n.startswith("devices/"))
    assert f"devices/{FED}-0003/client.key" in grown
    assert f"user {FED}-0003" in grown["broker/acl"].decode()


def test_rotate_and_revoke_change_only_that_identity(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    provision(Request(federation=FED, devices=3, out=out, mode="cert"))
    first = _files(out)
    serial = x509.load_pem_x509_certificate(first[f"devices/{FED}-0002/client.crt"]).serial_number
    provision(Request(federation=FED, devices=3, out=out, mode="cert",
                      rotate=[f"{FED}-0002"], revoke=[f"{FED}-0003"]))
    after = _files(out)
    assert after[f"devices/{FED}-0001/client.key"] == first[f"devices/{FED}-0001/client.key"]
    assert after[f"devices/{FED}-0002/client.key"] != first[f"devices/{FED}-0002/client.key"]
    assert not any(n.startswith(f"devices/{FED}-0003/") for n in after)
    assert f"user {FED}-0003" not in after["broker/acl"].decode()
    crl = x509.load_pem_x509_crl(after["broker/certs/crl.pem"])
    revoked3 = x509.load_pem_x509_certificate(first[f"devices/{FED}-0003/client.crt"])
    assert {r.serial_number for r in crl} == {serial, revoked3.serial_number}
    # Running again with the same --devices does not bring the revoked id back.
    provision(Request(federation=FED, devices=3, out=out, mode="cert"))
    assert not (out / "devices" / f"{FED}-0003").exists()


def test_refusals_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fleet"
    assert main(["provision", "--federation", FED, "--devices", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    cases = [
        (["--federation", "other", "--devices", "1"], "federation 'digits', not 'other'"),
        (["--federation", FED, "--devices", "1", "--mode", "cert"], "mode 'password'"),
        (["--federation", FED, "--devices", "1", "--revoke", "nobody"], "no such identity"),
        (["--federation", "bad/name", "--devices", "1"], "federation"),
        (["--federation", FED, "--devices", "1", "--broker-port", "9999"], "cannot change"),
    ]
    for args, message in cases:
        assert main(["provision", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fedmq provision: ")
        assert message in err
        assert err.count("\n") == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("mine")
    assert main(["provision", "--federation", FED, "--devices", "1", "--out", str(foreign)]) == 2
    assert "has no provision.json" in capsys.readouterr().err


def test_device_dir_and_broker_dir_set_the_paths_written(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    provision(Request(federation=FED, devices=1, out=out, mode="cert",
                      broker_dir=Path("/etc/mosquitto/fedmq"), device_dir="/etc/fedmq/{id}"))
    agent = tomllib.loads((out / "devices" / f"{FED}-0001" / "agent.toml").read_text())
    assert agent["broker"]["key_file"] == f"/etc/fedmq/{FED}-0001/client.key"
    conf = (out / "broker" / "mosquitto.conf").read_text()
    assert "crlfile /etc/mosquitto/fedmq/certs/crl.pem" in conf
    assert "persistence_location /etc/mosquitto/fedmq/data/" in conf


def test_dump_toml_round_trips() -> None:
    data = {"federation": 'a"b\\c', "n": 3, "x": 0.1, "flag": False, "inf": float("inf"),
            "list": [1, 2.5, "s"], "broker": {"host": "h", "nested": {"k": [True]}}}
    assert tomllib.loads(dump_toml(data, "# header")) == data

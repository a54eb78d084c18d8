"""Credentials for a production broker: a CA, certificates, a CRL and Mosquitto password hashes.

Certificates use ``cryptography``'s x509 (imported here only: ``fedmq provision --mode cert``
and the TLS files of either mode need it; devices never import this module). Keys are ECDSA
P-256: small, fast to make for thousands of devices, and accepted by Mosquitto's OpenSSL and
by Python's ``ssl``.

Password hashes have the format Mosquitto 2 writes and reads (``mosquitto_passwd``'s
sha512-pbkdf2): ``user:$7$ITERATIONS$base64(salt)$base64(hash)`` with a 12-byte salt and a
64-byte PBKDF2-HMAC-SHA512. ``mosquitto_passwd`` is used when installed, fed on stdin so no
password is ever on a command line; otherwise the same line is made here.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedmq.errors import FedmqError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

__all__ = [
    "MOSQUITTO_PBKDF2_ITERATIONS",
    "Issued",
    "hash_password",
    "issue_ca",
    "issue_certificate",
    "load_ca",
    "mosquitto_passwd_binary",
    "new_password",
    "password_line",
    "verify_password_line",
    "write_crl",
    "write_private",
]

#: What mosquitto_passwd 2.0 uses (it has no option to change it). The provisioned passwords
#: are 192 random bits, so the count adds nothing against guessing.
MOSQUITTO_PBKDF2_ITERATIONS = 101
_SALT_BYTES = 12
EXTRA_MISSING = ("fedmq provision needs the cryptography package for the TLS files: "
                 "pip install cryptography")


class ProvisionError(FedmqError):
    """Something provisioning needs is missing or inconsistent (one line, exit 2)."""


def new_password() -> str:
    """A random password: 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


def hash_password(password: str, salt: bytes | None = None,
                  iterations: int = MOSQUITTO_PBKDF2_ITERATIONS) -> str:
    """The ``$7$...`` hash Mosquitto 2 accepts for ``password`` (random salt unless given)."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return (f"$7${iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def verify_password_line(line: str, user: str, password: str) -> bool:
    """True if the password file ``line`` is ``user``'s and holds ``password`` (sha512-pbkdf2)."""
    name, _, hashed = line.strip().partition(":")
    parts = hashed.split("$")
    if name != user or len(parts) != 5 or parts[1] != "7":
        return False
    salt = base64.b64decode(parts[3])
    return secrets.compare_digest(hash_password(password, salt, int(parts[2])), hashed)


def mosquitto_passwd_binary() -> str | None:
    """``mosquitto_passwd`` if installed (Debian: package mosquitto), else None."""
    return shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd",
                                                            path="/usr/bin:/usr/sbin")


def password_line(user: str, password: str, tool: str | None) -> str:
    """One password-file line for ``user``: made by ``tool`` (mosquitto_passwd) if given,
    else by ``hash_password``. No newline at the end."""
    if tool is None:
        return f"{user}:{hash_password(password)}"
    with tempfile.TemporaryDirectory(prefix="fedmq-passwd-") as tmp:
        path = Path(tmp) / "passwd"
        path.touch(mode=0o600)
        # Not -b: the password goes on stdin (twice: it asks to confirm), never on a command
        # line that other users of the machine could read.
        done = subprocess.run([tool, str(path), user], input=f"{password}\n{password}\n",
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ProvisionError(f"{tool} failed for {user!r}: "
                                 f"{(done.stderr or done.stdout).strip()}")
        line = path.read_text(encoding="utf-8").strip()
    if not line.startswith(f"{user}:$"):
        raise ProvisionError(f"{tool} wrote an unexpected line for {user!r}")
    return line


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600 from creation on)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def _crypto() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError as exc:
        raise ProvisionError(EXTRA_MISSING) from exc


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Issued:
    """A key and its certificate, as written to disk."""

    def __init__(self, key: EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    def write(self, key_path: Path, cert_path: Path) -> None:
        """The key 0600 (PEM, unencrypted: a service reads it unattended), the cert 0644."""
        from cryptography.hazmat.primitives import serialization

        write_private(key_path, self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue_ca(common_name: str, days: int) -> Issued:
    """A self-signed CA that may sign certificates (not other CAs) and CRLs."""
    _crypto()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(key, cert)


def load_ca(key_path: Path, cert_path: Path) -> Issued:
    """The CA written by an earlier run."""
    _crypto()
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"{key_path}: not the EC key fedmq provision writes")
    return Issued(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    from cryptography import x509

    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def issue_certificate(ca: Issued, common_name: str, days: int, *,
                      server_names: Sequence[str] = ()) -> Issued:
    """A leaf certificate signed by ``ca``: for a server when ``server_names`` (its DNS names
    and IP addresses, which TLS clients check) are given, else for a client whose CN
    Mosquitto takes as the username (``use_identity_as_username``)."""
    _crypto()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name)).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False))
    if server_names:
        builder = builder.add_extension(_san(server_names), critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


def write_crl(ca: Issued, revoked: Iterable[int], path: Path, days: int) -> None:
    """A CRL signed by ``ca`` listing the ``revoked`` serial numbers, valid ``days`` days.

    Once it expires OpenSSL refuses *every* client certificate: run ``fedmq provision`` again
    (it rewrites the CRL) before then.
    """
    _crypto()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    now = _now()
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(now - dt.timedelta(minutes=5))
               .next_update(now + dt.timedelta(days=days)))
    for serial in sorted(set(revoked)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    crl = builder.sign(ca.key, hashes.SHA256())
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))

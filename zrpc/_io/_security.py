"""CurveZMQ keys: generating them, loading them with clear errors, and what a socket needs.

Key files are zmq.auth certificates: NAME.key holds a public key (give it to peers),
NAME.key_secret holds the key pair (keep it; mode 0600).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
import zmq.utils.z85


@dataclass(frozen=True)
class CurveKeys:
    """A socket's CURVE settings: its own key pair, and the server's public key if it
    connects to a server (None on a server socket)."""

    public: bytes
    secret: bytes
    server_key: bytes | None = None

    @property
    def is_server(self) -> bool:
        return self.server_key is None

    def as_client_of(self, server_key: bytes) -> CurveKeys:
        return CurveKeys(self.public, self.secret, server_key)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        if self.is_server:
            sock.curve_server = True
            sock.zap_domain = b"zrpc"
        else:
            sock.curve_serverkey = self.server_key


def _load(path: str | os.PathLike[str], want_secret: bool) -> tuple[bytes, bytes | None]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"key file {p} does not exist (create keys with `zrpc keygen DIR`)")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (ValueError, OSError, KeyError) as exc:
        raise ValueError(f"{p} is not a zmq.auth key file: {exc}") from None
    if want_secret and not secret:
        raise ValueError(f"{p} holds no secret key: give the NAME.key_secret file here")
    return public, secret


def load_keypair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    public, secret = _load(path, True)
    assert secret is not None
    return public, secret


def load_public(path: str | os.PathLike[str]) -> bytes:
    return _load(path, False)[0]


def server_keys(secret_path: str | os.PathLike[str]) -> CurveKeys:
    return CurveKeys(*load_keypair(secret_path))


def client_keys(server_key_path: str | os.PathLike[str] | None,
                secret_path: str | os.PathLike[str] | None) -> CurveKeys | None:
    """Both or neither: a client with half its keys is a mistake worth saying so."""
    if server_key_path is None and secret_path is None:
        return None
    if server_key_path is None or secret_path is None:
        raise ValueError("CURVE needs both the broker's public key (curve_server_key / "
                         "--curve-server-key) and this process's key pair (curve_secret / --curve-secret)")
    public, secret = load_keypair(secret_path)
    return CurveKeys(public, secret, load_public(server_key_path))


def load_authorized(directory: str | os.PathLike[str]) -> set[bytes]:
    """The public keys found in DIR (every *.key file)."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"authorized keys directory {d} does not exist")
    keys = set()
    for f in sorted(d.glob("*.key")):
        keys.add(load_public(f))
    return keys


def key_text(key: bytes) -> str:
    """A CURVE public key as the Z85 text a NAME.key file holds ("?" if it is not one)."""
    if len(key) != 32:
        return "?"
    return zmq.utils.z85.encode(key).decode("ascii")


def keygen(directory: str | os.PathLike[str], name: str = "zrpc") -> tuple[Path, Path]:
    """Writes NAME.key and NAME.key_secret in DIR (created if needed); the secret is 0600."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid key name {name!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise ValueError(f"{public} or {secret} already exists: choose another --name or directory")
    old = os.umask(0o077)
    try:
        zmq.auth.create_certificates(str(d), name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


class ZapGuard:
    """ZAP for a broker's sockets (zmq.auth.thread.ThreadAuthenticator underneath): admits the
    CURVE keys in `allowed`, and remembers who was refused, with which key, so the broker can
    raise an alert an operator can act on (which key to add, or which peer to stop)."""

    DOMAIN = "zrpc"

    def __init__(self, ctx: zmq.Context[Any], allowed: set[bytes]) -> None:
        from collections import deque

        from zmq.auth.thread import ThreadAuthenticator

        guard = self

        class _Authenticator(ThreadAuthenticator):
            async def handle_zap_message(self, msg: list[bytes]) -> None:
                guard._address = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
                guard._key = key_text(msg[6]) if len(msg) > 6 and msg[5] == b"CURVE" else "?"
                await super().handle_zap_message(msg)

            def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                                user_id: str = "anonymous") -> None:
                if status_code != b"200":
                    guard.refused.append((guard._address, guard._key,
                                          status_text.decode(errors="replace")))
                super()._send_zap_reply(request_id, status_code, status_text, user_id)

        self.allowed = allowed
        # (peer address, its public key in Z85, reason), bounded
        self.refused: deque[tuple[str, str, str]] = deque(maxlen=1000)
        self._address = "?"
        self._key = "?"
        self._auth = _Authenticator(ctx)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.allowed

    def start(self) -> None:
        self._auth.start()
        self._auth.configure_curve_callback(domain=self.DOMAIN, credentials_provider=self)

    def stop(self) -> None:
        self._auth.stop()

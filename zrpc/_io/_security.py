"""CurveZMQ keys: generating them, loading them with clear errors, what a socket needs, and
the roles of the keys a broker admits.

Key files are zmq.auth certificates: NAME.key holds a public key (give it to peers),
NAME.key_secret holds the key pair (keep it; mode 0600). A broker's authorized directory
holds the NAME.key files it admits and, optionally, ROLES_FILE: what each key may do
(docs/operations.md §7).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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


def authorized_keys(directory: str | os.PathLike[str]) -> dict[str, bytes]:
    """The public keys found in DIR, by name (NAME.key: NAME -> its Z85 public key)."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"authorized keys directory {d} does not exist")
    return {f.name[:-len(".key")]: load_public(f) for f in sorted(d.glob("*.key"))}


def load_authorized(directory: str | os.PathLike[str]) -> set[bytes]:
    """The public keys found in DIR (every *.key file)."""
    return set(authorized_keys(directory).values())


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


# --- roles -----------------------------------------------------------------------------------

ROLES_FILE = "roles.toml"
"""The roles of the authorized keys: a file of this name in the authorized directory, read
with the keys (at start and on SIGHUP). Without one, every authorized key may do everything."""

ANY = "*"
"""In `serve` or `call`: every service."""

_ROLE_FIELDS = ("serve", "call", "admin")


@dataclass(frozen=True)
class Role:
    """What one key may do: serve and call these services (ANY: every one), and call the
    broker's admin methods (`zrpc.*` but ping and health)."""

    serve: frozenset[str] = frozenset()
    call: frozenset[str] = frozenset()
    admin: bool = False

    def serves(self, service: str) -> bool:
        return ANY in self.serve or service in self.serve

    def calls(self, service: str) -> bool:
        return ANY in self.call or service in self.call

    def __str__(self) -> str:
        def names(s: frozenset[str]) -> str:
            return ",".join(sorted(s)) or "-"

        return f"serve {names(self.serve)}, call {names(self.call)}{', admin' if self.admin else ''}"


NO_ROLE = Role()
"""A key a roles file does not name, when it has no [default]: zrpc.ping and zrpc.health only."""
EVERY_ROLE = Role(frozenset({ANY}), frozenset({ANY}), True)
"""Every authorized key's role when the directory has no roles file."""


@dataclass(frozen=True)
class Roles:
    """A roles file, read: each key's Role by its Z85 public key, the role of the keys it does
    not name, and the names of the directory's key files (for logs and alerts)."""

    source: str
    keys: Mapping[str, Role]
    default: Role = NO_ROLE
    names: Mapping[str, str] = field(default_factory=dict)
    """Z85 public key -> the name of its key file."""
    authorized: frozenset[str] | None = None
    """The keys the directory holds now (None: any key ZAP admitted). A key removed from it
    may do nothing more, even on a connection ZAP admitted before the reload."""

    @classmethod
    def everyone(cls, named: Mapping[str, bytes]) -> Roles:
        """No roles file: every key of the directory may do everything."""
        return cls("(no roles file)", {}, EVERY_ROLE, {v.decode("ascii"): k for k, v in named.items()})

    def admitting(self, allowed: Iterable[bytes]) -> Roles:
        """These roles for the keys ZAP admits now (`allowed`), and for no other key."""
        return dataclasses.replace(self, authorized=frozenset(k.decode("ascii") for k in allowed))

    def role(self, key: str | None) -> Role:
        """A message without a key (none can reach a broker with keys) may do nothing; nor
        may a key no longer in the directory."""
        if key is None or (self.authorized is not None and key not in self.authorized):
            return NO_ROLE
        return self.keys.get(key, self.default)

    def may_serve(self, key: str | None, service: str) -> bool:
        return self.role(key).serves(service)

    def may_call(self, key: str | None, service: str) -> bool:
        return self.role(key).calls(service)

    def may_admin(self, key: str | None) -> bool:
        return self.role(key).admin

    def label(self, key: str | None) -> str:
        """The key's file name when the directory has it, else the key itself."""
        if key is None:
            return "(no key)"
        return self.names.get(key, key)

    def describe(self) -> str:
        """One line for the broker's log."""
        return (f"roles from {self.source}: {len(self.keys)} key(s) named, any other key: "
                f"{self.default}")


def is_key_text(text: str) -> bool:
    """Whether `text` is a CURVE public key in Z85 (40 characters, as NAME.key holds it)."""
    if len(text) != 40:
        return False
    try:
        return len(zmq.utils.z85.decode(text.encode("ascii"))) == 32
    except (ValueError, KeyError, UnicodeEncodeError, IndexError):
        return False


def parse_roles(text: str, source: str, named: Mapping[str, bytes]) -> Roles:
    """A roles file's text (TOML): `[default]` and `[keys.NAME]` tables of `serve`, `call`
    (lists of service names, or "*") and `admin` (bool). NAME is a key file's name in the
    authorized directory (`named`: NAME -> Z85 key) or a Z85 public key. Any mistake is a
    ValueError of one line, naming the file and the table."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source} is not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"default", "keys"})
    if unknown:
        raise ValueError(f"{source}: unknown table or key {', '.join(unknown)} (a roles file has "
                         "[default] and [keys.NAME] tables)")
    default = _role(doc.get("default", {}), f"{source}: [default]")
    tables = doc.get("keys", {})
    if not isinstance(tables, dict):
        raise ValueError(f"{source}: `keys` must be tables ([keys.NAME])")
    keys: dict[str, Role] = {}
    for name, spec in tables.items():
        where = f"{source}: [keys.{name if name.isidentifier() else repr(name)}]"
        raw = named.get(name)
        if raw is not None:
            key = raw.decode("ascii")
        elif is_key_text(name):
            key = name
        else:
            raise ValueError(f"{where}: there is no {name}.key in the authorized directory (name a "
                             "key file without its .key, or give a public key in Z85)")
        if key in keys:
            raise ValueError(f"{where}: this key has a table already (by its name and its Z85 text)")
        keys[key] = _role(spec, where)
    names = {v.decode("ascii"): k for k, v in named.items()}
    return Roles(source, keys, default, names)


def _role(spec: Any, where: str) -> Role:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a table of serve, call and admin")
    unknown = sorted(set(spec) - set(_ROLE_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field {', '.join(unknown)} (expected serve, call, admin)")
    admin = spec.get("admin", False)
    if type(admin) is not bool:
        raise ValueError(f"{where}: admin must be true or false")
    return Role(_services(spec.get("serve", []), where, "serve"),
                _services(spec.get("call", []), where, "call"), admin)


def _services(value: Any, where: str, what: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: {what} must be a list of service names (or [\"*\"] for all)")
    if "zrpc" in value:
        raise ValueError(f"{where}: {what} names zrpc, the broker's own service: its admin methods "
                         "are granted by admin = true (zrpc.ping and zrpc.health are open to all)")
    return frozenset(value)


def load_roles(directory: str | os.PathLike[str], named: Mapping[str, bytes]) -> Roles | None:
    """The authorized directory's ROLES_FILE, parsed (None when there is none: no roles)."""
    path = Path(directory) / ROLES_FILE
    if not path.exists():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    return parse_roles(text, str(path), named)

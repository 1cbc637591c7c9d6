"""The etcd edge: threads that carry out a Membership core's actions on etcd (etcd3gw, the
HTTP/JSON gateway) and hand back what etcd answered, so that the broker loop never waits
on etcd; and the same for an election (KeyEdge: one key, its lease, a watch on it).

One thread runs the exchanges in order (grant, put, refresh, fetch, revoke), each answered
by exactly one event; a second reads the watch's stream while it lasts. Several endpoints
are tried in turn: a request that gets no answer from one goes to the next, and the one
that answered is asked first next time. Every request is bounded by `timeout`, so a stopped
etcd costs a failure a second, never a hung broker.

etcd3gw's own watch (`watch_prefix`) cannot say that its stream ended, nor why, and its
`put` and `get_prefix` drop the revision the watch must start from: the watch and those two
requests use the client's session and `post` directly.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import etcd3gw
import requests
from etcd3gw.exceptions import (
    ConnectionFailedError,
    ConnectionTimeoutError,
    Etcd3Exception,
    InternalServerError,
)

from zrpc._core._membership import (
    EtcdAction,
    Event,
    ExchangeFailed,
    Fetch,
    GrantLease,
    LeaseExpired,
    LeaseGranted,
    MemberDeleted,
    MemberPut,
    Put,
    Refresh,
    RefreshOk,
    Registered,
    Revoke,
    Snapshot,
    Watch,
    WatchEnded,
)
from zrpc._defaults import ETCD_TIMEOUT

__all__ = ["EtcdEdge", "EtcdError", "KeyEdge", "KeyValue", "LeaseGone", "read_members"]

log = logging.getLogger("zrpc.etcd")

API_PATH = "/v3/"
"""The gateway's path on etcd 3.4 and later: set, so no request is spent discovering it."""

_WHY: dict[type[Exception], str] = {ConnectionFailedError: "cannot connect",
                                    ConnectionTimeoutError: "no answer in time"}


class EtcdError(Exception):
    """No endpoint answered the request (or one answered an error): the reason, for a log."""


class LeaseGone(Exception):
    """etcd answered that the lease does not exist (expired or revoked)."""



def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _range_end(prefix: str) -> str:
    """The end of the key range that holds every key starting with `prefix` (etcd's idiom:
    the prefix with its last byte incremented)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode("ascii")


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The stream's messages, one JSON object a line, whatever the chunks' boundaries."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        yield from (line for line in lines if line.strip())
    if buf.strip():
        yield buf


def _member(prefix: str, key: bytes, value: bytes) -> tuple[str, dict[str, Any]] | None:
    """A registration key and value as (name, info); None for a key that is not one."""
    name = key.decode(errors="replace")[len(prefix):]
    if not name or "/" in name:
        return None
    try:
        info = json.loads(value)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        info = {"malformed": value[:100].decode(errors="replace")}
    return name, info


class _Endpoints:
    """etcd3gw clients for each endpoint; the one that last answered goes first."""

    def __init__(self, endpoints: Sequence[tuple[str, int]], timeout: float) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._clients = [etcd3gw.client(host=h, port=p, timeout=timeout, api_path=API_PATH)
                         for h, p in endpoints]
        self._first = 0

    def describe(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    def order(self) -> Iterator[tuple[int, etcd3gw.Etcd3Client]]:
        n = len(self._clients)
        for i in range(n):
            j = (self._first + i) % n
            yield j, self._clients[j]

    def call(self, request: Callable[[etcd3gw.Etcd3Client], Any]) -> Any:
        """`request` on the first endpoint that answers; EtcdError naming the last failure.
        An error etcd answered (other than a missing lease) is not tried elsewhere."""
        last = "no endpoint"
        for j, client in self.order():
            try:
                result = request(client)
            except requests.Timeout:
                last = f"{client.host}:{client.port}: no answer in time"
                continue
            except requests.ConnectionError:
                last = f"{client.host}:{client.port}: cannot connect"
                continue
            except (ConnectionFailedError, ConnectionTimeoutError) as exc:
                last = f"{client.host}:{client.port}: {_WHY.get(type(exc), type(exc).__name__)}"
                continue
            except Etcd3Exception as exc:
                text = str(exc.detail_text or exc)
                if "lease not found" in text:
                    raise LeaseGone(text) from None
                last = f"{client.host}:{client.port}: {type(exc).__name__} {text[:200]}"
                if isinstance(exc, InternalServerError):
                    continue  # this member has no leader (or is failing): the next may not be
                raise EtcdError(last) from None
            except (requests.RequestException, ValueError, KeyError) as exc:
                last = f"{client.host}:{client.port}: {type(exc).__name__}: {exc}"[:300]
                continue
            self._first = j
            return result
        raise EtcdError(last)

    def close(self) -> None:
        for c in self._clients:
            c.session.close()


def _grant(client: etcd3gw.Etcd3Client, ttl: int) -> tuple[int, float]:
    result = client.post(client.get_url("/lease/grant"), json={"TTL": ttl, "ID": 0})
    return int(result["ID"]), float(result.get("TTL", ttl))


def _put(client: etcd3gw.Etcd3Client, key: str, value: str, lease: int) -> int:
    result = client.post(client.get_url("/kv/put"),
                         json={"key": _b64(key), "value": _b64(value), "lease": lease})
    return int(result["header"]["revision"])


def _refresh(client: etcd3gw.Etcd3Client, lease: int) -> float:
    ttl = etcd3gw.Lease(lease, client).refresh()
    if ttl <= 0:
        raise LeaseGone("the lease expired")
    return float(ttl)


def _time_to_live(client: etcd3gw.Etcd3Client, lease: int) -> dict[str, Any]:
    result: dict[str, Any] = client.post(client.get_url("/kv/lease/timetolive"), json={"ID": lease})
    return result


def _range(client: etcd3gw.Etcd3Client, prefix: str) -> tuple[list[tuple[bytes, bytes, int]], int]:
    """Every key under `prefix` as (key, value, lease), and the revision they are as of."""
    result = client.post(client.get_url("/kv/range"),
                         json={"key": _b64(prefix), "range_end": _range_end(prefix)})
    kvs = [(_unb64(kv["key"]), _unb64(kv.get("value", "")), int(kv.get("lease", 0)))
           for kv in result.get("kvs", [])]
    return kvs, int(result["header"]["revision"])


def _open_stream(eps: _Endpoints, body: dict[str, Any], current: Callable[[], bool]
                 ) -> requests.Response | str:
    """A watch stream from the first endpoint that opens one, else why none did (also when
    the watch stopped being `current` meanwhile)."""
    last = "no endpoint"
    for _, client in eps.order():
        if not current():
            return "cancelled"
        try:
            r = client.session.post(client.get_url("/watch"), json=body, stream=True,
                                    timeout=(eps.timeout, None))
        except requests.RequestException as exc:
            last = f"{client.host}:{client.port}: {type(exc).__name__}"
            continue
        if r.status_code != 200:
            last = f"{client.host}:{client.port}: HTTP {r.status_code}"
            r.close()
            continue
        return r
    return last


def _shutdown(resp: requests.Response | None) -> None:
    """Ends a stream at once: etcd3gw's own cancel does the same, a shutdown of the stream's
    socket (its reading thread sees the connection close)."""
    if resp is None:
        return
    try:
        fp = resp.raw._fp  # the only way to the socket under a stream (etcd3gw's way too)
        s = socket.socket(fileno=fp.fileno()) if fp is not None else None
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            finally:
                s.detach()  # the response still owns the descriptor
    except (OSError, AttributeError, ValueError):
        pass
    resp.close()


class EtcdEdge:
    """Carries out EtcdActions and hands each answer to `deliver` (from its own threads: the
    loop queues it and wakes itself). `stop()` ends both threads; a Revoke given before it
    is carried out first."""

    def __init__(self, endpoints: Sequence[tuple[str, int]], deliver: Callable[[Event], None], *,
                 timeout: float = ETCD_TIMEOUT,
                 logger: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> None:
        self._eps = _Endpoints(endpoints, timeout)
        self._deliver = deliver
        self._log = logger or log
        self._queue: queue.SimpleQueue[EtcdAction | None] = queue.SimpleQueue()  # None: stop
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watch: threading.Thread | None = None
        self._watch_resp: requests.Response | None = None
        self._watch_seq: int | None = None
        self._thread = threading.Thread(target=self._run, name="zrpc-etcd", daemon=True)

    @property
    def where(self) -> str:
        return self._eps.describe()

    def start(self) -> None:
        self._thread.start()

    def submit(self, action: EtcdAction) -> None:
        self._queue.put(action)

    def stop(self, timeout: float | None = None) -> None:
        """Cancels the watch, carries out what was submitted (the Revoke of a clean stop),
        and waits up to `timeout` (default: a request's) for the thread to end."""
        self._stopping.set()
        self._cancel_watch()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(self._eps.timeout * 2 if timeout is None else timeout)
        watch = self._watch
        if watch is not None:
            watch.join(0.5)
        self._eps.close()

    # --- the exchanges ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            action = self._queue.get()
            if action is None:
                return
            try:
                event = self._carry_out(action)
            except Exception as exc:  # noqa: BLE001 - a bug costs this exchange, never the loop
                self._log.error("internal error in the etcd edge while carrying out %r",
                                action, exc_info=exc)
                event = ExchangeFailed(action.seq, type(action).__name__.lower(), f"internal error: {exc}")
            if event is not None and not (self._stopping.is_set() and isinstance(action, Revoke)):
                self._give(event)

    def _give(self, event: Event) -> None:
        try:
            self._deliver(event)
        except Exception as exc:  # noqa: BLE001 - the loop is gone or going: nothing to tell
            self._log.debug("an etcd event could not be delivered: %s", exc)

    def _carry_out(self, a: EtcdAction) -> Event | None:
        eps = self._eps
        try:
            if isinstance(a, GrantLease):
                lease, ttl = eps.call(lambda c: _grant(c, a.ttl))
                return LeaseGranted(a.seq, lease, ttl)
            if isinstance(a, Put):
                revision = eps.call(lambda c: _put(c, a.key, a.value, a.lease))
                return Registered(a.seq, a.lease, revision)
            if isinstance(a, Refresh):
                return RefreshOk(a.seq, a.lease, eps.call(lambda c: _refresh(c, a.lease)))
            if isinstance(a, Fetch):
                kvs, revision = eps.call(lambda c: _range(c, a.prefix))
                members = dict(m for k, v, _ in kvs if (m := _member(a.prefix, k, v)) is not None)
                return Snapshot(a.seq, members, revision)
            if isinstance(a, Watch):
                self._start_watch(a)
                return None
            if isinstance(a, Revoke):
                eps.call(lambda c: etcd3gw.Lease(a.lease, c).revoke())
                self._log.info("revoked its etcd lease %x: left the cluster", a.lease)
                return None
        except LeaseGone:
            if isinstance(a, (Put, Refresh)):
                return LeaseExpired(a.seq, a.lease)
            return None  # a revoke of a lease that is gone already: done
        except EtcdError as exc:
            return ExchangeFailed(a.seq, type(a).__name__.lower(), str(exc))
        raise TypeError(f"the etcd edge cannot carry out {a!r}")

    # --- the watch -------------------------------------------------------------------------

    def _start_watch(self, a: Watch) -> None:
        self._cancel_watch()
        with self._lock:
            self._watch_seq = a.seq
        t = threading.Thread(target=self._watching, args=(a,), name="zrpc-etcd-watch", daemon=True)
        self._watch = t
        t.start()

    def _cancel_watch(self) -> None:
        """Ends the stream at once (its thread sees the connection close)."""
        with self._lock:
            self._watch_seq = None
            resp, self._watch_resp = self._watch_resp, None
        _shutdown(resp)

    def _current(self, seq: int) -> bool:
        with self._lock:
            return self._watch_seq == seq and not self._stopping.is_set()

    def _watching(self, a: Watch) -> None:
        """One watch from `a.start_revision`, until its stream ends: its events, then
        WatchEnded (or ExchangeFailed when no endpoint would start it)."""
        body: dict[str, Any] = {"create_request": {"key": _b64(a.prefix), "range_end": _range_end(a.prefix),
                                   "start_revision": a.start_revision}}
        resp = _open_stream(self._eps, body, lambda: self._current(a.seq))
        if isinstance(resp, str):
            if self._current(a.seq):
                self._give(ExchangeFailed(a.seq, "watch", resp))
            return
        with self._lock:
            if self._watch_seq != a.seq:
                resp.close()
                return
            self._watch_resp = resp
        reason = "the stream ended"
        try:
            for line in _lines(resp.iter_content(chunk_size=None)):
                if not self._current(a.seq):
                    return
                ended = self._watch_line(a, json.loads(line))
                if ended is not None:
                    reason = ended
                    break
        except (requests.RequestException, OSError, ValueError, AttributeError) as exc:
            reason = f"{type(exc).__name__}"
        finally:
            resp.close()
        if self._current(a.seq):
            self._give(WatchEnded(a.seq, reason))

    def _watch_line(self, a: Watch, msg: dict[str, Any]) -> str | None:
        """One message of the stream: its events delivered; a reason when it ends the watch."""
        if "error" in msg:
            return f"etcd: {msg['error'].get('message', msg['error'])}"
        result = msg.get("result", {})
        if result.get("canceled"):
            return f"cancelled by etcd: {result.get('cancel_reason') or 'compacted'}"
        for ev in result.get("events", []):
            kv = ev["kv"]
            key = _unb64(kv["key"])
            revision = int(kv.get("mod_revision", 0))
            if ev.get("type") == "DELETE":
                name = key.decode(errors="replace")[len(a.prefix):]
                if name and "/" not in name:
                    self._give(MemberDeleted(a.seq, name, revision))
            else:
                m = _member(a.prefix, key, _unb64(kv.get("value", "")))
                if m is not None:
                    self._give(MemberPut(a.seq, m[0], m[1], revision))
        return None


# --- an election: one key, its lease, a watch on it ------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyValue:
    """A key as etcd holds it."""

    value: bytes
    lease: int
    create_revision: int
    mod_revision: int


def _key_value(kv: dict[str, Any]) -> KeyValue:
    return KeyValue(_unb64(kv.get("value", "")), int(kv.get("lease", 0)),
                    int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0)))


def _create_if_absent(client: etcd3gw.Etcd3Client, key: str, value: str, lease: int
                      ) -> tuple[bool, KeyValue | None, int]:
    """One transaction: put `key` on `lease` if its create revision is 0 (absent), else read
    it. (won, the key as it is now, the revision it is as of)."""
    k = _b64(key)
    txn = {"compare": [{"key": k, "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
           "success": [{"request_put": {"key": k, "value": _b64(value), "lease": lease}}],
           "failure": [{"request_range": {"key": k}}]}
    result = client.post(client.get_url("/kv/txn"), json=txn)
    revision = int(result["header"]["revision"])
    if result.get("succeeded"):  # the put is the transaction's one write: its revision
        return True, KeyValue(value.encode(), lease, revision, revision), revision
    responses = result.get("responses") or [{}]
    kvs = responses[0].get("response_range", {}).get("kvs", [])
    return False, (_key_value(kvs[0]) if kvs else None), revision


class KeyEdge:
    """The etcd side of an election: its requests (jobs the loop submits, each calling the
    blocking requests below and handing back what came of it) run in order on one thread,
    and the watch of its key on another. Every request is bounded by `timeout` per
    endpoint; endpoints are tried in turn as EtcdEdge's are."""

    def __init__(self, endpoints: Sequence[tuple[str, int]], *, timeout: float = ETCD_TIMEOUT,
                 logger: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> None:
        self._eps = _Endpoints(endpoints, timeout)
        self._log = logger or log
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watch: threading.Thread | None = None
        self._watch_resp: requests.Response | None = None
        self._watch_id = 0  # the watch running (0: none)
        self._thread = threading.Thread(target=self._run, name="zrpc-election", daemon=True)

    @property
    def where(self) -> str:
        return self._eps.describe()

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        """`job` runs on the edge's thread, after every job submitted before it."""
        self._queue.put(job)

    def stop(self, timeout: float | None = None) -> None:
        """Cancels the watch, runs what was submitted (a clean stop's revoke), and waits up to
        `timeout` (default: two requests') for the thread to end."""
        self._stopping.set()
        self.cancel_watch()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(self._eps.timeout * 2 if timeout is None else timeout)
        watch = self._watch
        if watch is not None:
            watch.join(0.5)
        self._eps.close()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - a bug costs this request, never the edge
                self._log.error("internal error in the election's etcd edge", exc_info=exc)

    # --- blocking requests (for jobs): EtcdError when no endpoint answers ------------------

    def grant(self, ttl: int) -> tuple[int, float]:
        """A new lease: (its id, the TTL etcd granted)."""
        result: tuple[int, float] = self._eps.call(lambda c: _grant(c, ttl))
        return result

    def renew(self, lease: int) -> float:
        """The lease's TTL, renewed; LeaseGone when etcd no longer has it."""
        ttl: float = self._eps.call(lambda c: _refresh(c, lease))
        return ttl

    def create_if_absent(self, key: str, value: str, lease: int) -> tuple[bool, KeyValue | None, int]:
        """(won, the key as it is now, the revision as of which); LeaseGone when the lease is."""
        result: tuple[bool, KeyValue | None, int] = self._eps.call(
            lambda c: _create_if_absent(c, key, value, lease))
        return result

    def revoke(self, lease: int) -> None:
        """Best effort: a lease etcd no longer has is revoked already."""
        try:
            self._eps.call(lambda c: etcd3gw.Lease(lease, c).revoke())
        except LeaseGone:
            pass

    # --- the watch -------------------------------------------------------------------------

    def watch(self, key: str, start_revision: int,
              on_event: Callable[[KeyValue | None, int], None],
              on_end: Callable[[str, bool], None]) -> None:
        """Watches `key` from `start_revision` (replacing the watch running): `on_event(kv,
        revision)` for each put (kv None: deleted), then `on_end(reason, failed)` once, failed
        when no endpoint would start it. Callbacks run on the watch's thread, and only while
        this is the watch running."""
        self.cancel_watch()
        with self._lock:
            self._watch_id += 1
            wid = self._watch_id
        t = threading.Thread(target=self._watching, args=(wid, key, start_revision, on_event, on_end),
                             name="zrpc-election-watch", daemon=True)
        self._watch = t
        t.start()

    def cancel_watch(self) -> None:
        with self._lock:
            self._watch_id += 1
            resp, self._watch_resp = self._watch_resp, None
        _shutdown(resp)

    def _current(self, wid: int) -> bool:
        with self._lock:
            return self._watch_id == wid and not self._stopping.is_set()

    def _watching(self, wid: int, key: str, start_revision: int,
                  on_event: Callable[[KeyValue | None, int], None],
                  on_end: Callable[[str, bool], None]) -> None:
        body: dict[str, Any] = {"create_request": {"key": _b64(key), "start_revision": start_revision}}
        resp = _open_stream(self._eps, body, lambda: self._current(wid))
        if isinstance(resp, str):
            if self._current(wid):
                on_end(resp, True)
            return
        with self._lock:
            if self._watch_id != wid:
                resp.close()
                return
            self._watch_resp = resp
        reason = "the stream ended"
        try:
            for line in _lines(resp.iter_content(chunk_size=None)):
                if not self._current(wid):
                    return
                msg = json.loads(line)
                if "error" in msg:
                    reason = f"etcd: {msg['error'].get('message', msg['error'])}"
                    break
                result = msg.get("result", {})
                if result.get("canceled"):
                    reason = f"cancelled by etcd: {result.get('cancel_reason') or 'compacted'}"
                    break
                for ev in result.get("events", []):
                    kv = ev["kv"]
                    revision = int(kv.get("mod_revision", 0))
                    on_event(None if ev.get("type") == "DELETE" else _key_value(kv), revision)
        except (requests.RequestException, OSError, ValueError, AttributeError, KeyError) as exc:
            reason = f"{type(exc).__name__}"
        finally:
            resp.close()
        if self._current(wid):
            on_end(reason, False)


def read_members(endpoints: Sequence[tuple[str, int]], prefix: str,
                 timeout: float = ETCD_TIMEOUT) -> list[dict[str, Any]]:
    """Every member registered under `prefix`, for operator tools: its registration plus
    `lease_ttl_s` (seconds its lease has left) and `lease_age_s` (seconds since it was last
    renewed). EtcdError when no endpoint answers."""
    eps = _Endpoints(endpoints, timeout)
    try:
        kvs, _ = eps.call(lambda c: _range(c, prefix))
        out: list[dict[str, Any]] = []
        for key, value, lease in kvs:
            m = _member(prefix, key, value)
            if m is None:
                continue
            info = {**m[1], "name": m[0], "lease": lease}
            if lease:
                try:
                    ttl = eps.call(partial(_time_to_live, lease=lease))
                    left, granted = int(ttl.get("TTL", -1)), int(ttl.get("grantedTTL", 0))
                    info["lease_ttl_s"] = left
                    info["lease_age_s"] = granted - left if left >= 0 else None
                except (EtcdError, LeaseGone):
                    info["lease_ttl_s"] = info["lease_age_s"] = None
            out.append(info)
        return out
    except LeaseGone as exc:
        raise EtcdError(str(exc)) from None
    finally:
        eps.close()

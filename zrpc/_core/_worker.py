"""WorkerCore: a worker's rules (what to run, what to answer, when to heartbeat, reconnect and
leave), sans-IO.

The loop (zrpc/_io/_worker.py) hands it what happened (frames from broker link i, a handler's
result, a stop, a handshake's outcome) and carries out the actions it returns; it calls
`tick()` whenever it wakes and sleeps until `next_deadline()`. The core never touches a socket,
a thread or the OS clock, so every rule below is tested on a fake clock.

Rules (docs/protocol.md sections 8 and 10):

1. Any message from a broker, even one that does not decode, is a sign of life: the link's
   silence ends and its reconnect backoff starts again. Undecodable and unexpected messages
   are dropped and counted (`malformed`).
2. Every REQUEST is answered once. A probe is answered from the reply cache alone: the cached
   reply; CALL_STATE_UNKNOWN for a tombstone or when the cache cannot know; NOT_SEEN when the
   call never ran here; nothing while it runs (its reply will go to that broker too).
3. A call runs only when the cache has never seen it. An unknown service or method is answered
   METHOD_NOT_FOUND, a budget of 0 TIMEOUT. A duplicate of a running call joins it, one of a
   finished call is answered from the cache, one whose reply is gone CALL_STATE_UNKNOWN. A call
   is idempotent only when the broker's header says so and its method is.
4. At most `concurrency` sync handlers run at once (the thread pool's size); more wait, in
   arrival order, and one whose budget ran out while it waited is answered TIMEOUT, never run.
   Async handlers start at once (one event loop runs them all); inline ones (declared
   `inline=True`) run on the loop's thread at once, until one takes longer than INLINE_LIMIT:
   that method runs in the pool from then on. READY announces `concurrency + prefetch`.
5. A reply goes to every broker that sent the call, or a probe for it, while it ran; when that
   link is closed or full, through another one.
6. Every interval, on every open link, busy or not: a HEARTBEAT with `internal_errors` and
   `active_epoch` (the highest epoch among links whose latest heartbeat said "active"). A
   broker's valid `interval_ms` and `liveness` are adopted; `register: true` is answered READY.
7. A link silent for `interval * liveness` is closed and reopened after a backoff (250 ms
   doubling to 8 s, jittered). Every opening sends READY, or DISCONNECT once leaving.
8. A stop with drain: DISCONNECT to every link, READY never again. The worker leaves once no
   call is in flight and every open link acknowledged (or max(1 s, 4 intervals) passed), or at
   the drain timeout with calls unfinished. A link that let it go is not reopened.
9. A second stop, or a stop without drain, leaves at once.
10. Fencing (`--elect`, docs/protocol.md section 8): the worker keeps the highest epoch it has
    seen, stamped on a REQUEST (`epoch` header) or in a heartbeat that said "active". A
    REQUEST (a call or a probe) stamped with a lower epoch is answered NOT_ACTIVE, never run
    and never cached: the broker that sent it no longer holds the active role, and the call
    may run through the one that does. A REQUEST without `epoch` (Binary Star, a lone broker)
    is not checked; an `epoch` that is not a number counts as 0.
11. Cluster mode (`split=True`, DESIGN.md §9): brokers join (`add_broker`: a new link, opened
    at once) and leave (`remove_broker`: closed for good, never reopened; its replies go
    through the others). Every broker serves, so each READY announces a share of
    `concurrency + prefetch`, split evenly over the brokers in the set (at least 1 each): the
    worker is never promised twice over. When the set changes, every open link is told its new
    share (READY again: the broker keeps the calls it has here).
12. A method declared `allow=[keys]` runs only for a caller the broker named (`caller`
    header: its CURVE key) among those keys; any other call, or one naming no caller (a
    broker without keys), is answered UNAUTHORIZED, never run and never cached, and counted
    (`unauthorized`). A probe is answered as for any call (a refused call never ran here).
"""

from __future__ import annotations

import enum
import logging
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from zrpc._core._clock import Clock
from zrpc._core._context import CallContext
from zrpc._core._frames import (
    H_ATTEMPT,
    H_BUDGET,
    H_CALLER,
    H_EPOCH,
    H_IDEMPOTENT,
    H_PROBE,
    H_TRACE,
    WORKER,
    Disconnect,
    Heartbeat,
    Message,
    Ready,
    Status,
    WorkerReply,
    WorkerRequest,
    decode_frames,
    encode,
)
from zrpc._core._liveness import Backoff, LivenessTracker
from zrpc._core._malformed import Malformed
from zrpc._core._reply_cache import DONE, NEW, UNKNOWN, Entry, ReplyCache
from zrpc._core._serial import pack_error
from zrpc._core._service import Method, Service
from zrpc._defaults import (
    DRAIN_TIMEOUT,
    HEARTBEAT_INTERVAL,
    INLINE_LIMIT,
    LIVENESS,
    WORKER_CONCURRENCY,
    WORKER_PREFETCH,
)
from zrpc._errors import ProtocolError

UNKNOWN_BODY = pack_error("CallStateUnknown", "this call ran here already; its reply is no longer held")
INTERNAL_BODY = pack_error("InternalError", "the worker failed to run or answer this call")
EXPIRED_BODY = pack_error("Timeout", "the call's deadline passed while it waited for a handler thread")

MAX_EPOCH = 2**63 - 1
"""Epochs are etcd revisions (int64) or Binary Star's counts: a larger one is garbage."""

DRAIN_GRACE_MIN = 1.0
"""Seconds a drained worker waits at least for the brokers' acknowledgements (or 4 intervals,
if longer): a broker that is gone must not keep it forever."""

# --- events (inputs) ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageArrived:
    """A decoded message from broker link `link` (frames_received() decodes and sends this)."""

    link: int
    message: Message


@dataclass(frozen=True, slots=True)
class CallFinished:
    """A handler the core asked for (`call`) is done: its reply's status and body."""

    call: RunHandler
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class InlineRan:
    """An inline call took `seconds` on the loop's thread (the loop reports only slow ones)."""

    call: RunHandler
    seconds: float


@dataclass(frozen=True, slots=True)
class StopRequested:
    """SIGTERM, Ctrl-C or Worker.stop(): drain first, or leave at once."""

    drain: bool = True


@dataclass(frozen=True, slots=True)
class HandshakeEnded:
    """A link's security handshake: `refused` says why the broker refused it, None if accepted."""

    link: int
    refused: str | None = None


@dataclass(frozen=True, slots=True)
class OpenFailed:
    """The loop could not open the link the core asked for: try again after a backoff."""

    link: int


Event = Union[MessageArrived, CallFinished, InlineRan, StopRequested, HandshakeEnded, OpenFailed]  # noqa: UP007

# --- actions (outputs) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Frames for one link (heartbeat, READY, DISCONNECT); lost if it is closed or full."""

    link: int
    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class SendReply:
    """A reply, to the first of `links` that takes it (none: the reply is lost, counted)."""

    links: tuple[int, ...]
    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class OpenLink:
    """Open a fresh socket to broker `link`; the frames to send on it follow as a Send."""

    link: int


@dataclass(frozen=True, slots=True)
class CloseLink:
    link: int


@dataclass(frozen=True, slots=True)
class RunHandler:
    """Run `method` for `request` (off the loop, unless `inline`); hand the result back as
    CallFinished."""

    link: int
    request: WorkerRequest
    method: Method
    inline: bool = False
    deadline: float | None = None  # from the call's budget: past it, a waiting call never runs

    def context(self, clock: Clock) -> CallContext:
        """What `zrpc.current_call()` says while it runs (headers of the wrong type are left out)."""
        req = self.request
        h = req.headers
        attempt, trace, caller = h.get(H_ATTEMPT), h.get(H_TRACE), h.get(H_CALLER)
        return CallContext(req.service, req.method, req.request_id,
                           attempt if type(attempt) is int else 0,
                           trace if type(trace) is str else None, self.deadline,
                           caller if type(caller) is str else None, "server", clock)


@dataclass(frozen=True, slots=True)
class Log:
    level: int  # a logging level
    text: str


@dataclass(frozen=True, slots=True)
class Exit:
    """Leave: close everything. `at_once`: without waiting for the last replies to go out."""

    at_once: bool = False


Action = Union[Send, SendReply, OpenLink, CloseLink, RunHandler, Log, Exit]  # noqa: UP007


class Phase(enum.Enum):
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class _Link:
    """What the core knows of its connection to one broker."""

    def __init__(self, index: int, endpoint: str, rng: random.Random | None) -> None:
        self.index = index
        self.endpoint = endpoint
        self.open = False
        self.refused = False
        self.last_beat = 0.0
        self.acked = False  # our DISCONNECT was acknowledged
        self.backoff = Backoff(rng=rng)
        self.reconnect_at: float | None = None
        self.epoch: int | None = None  # its epoch while its latest heartbeat says "active"
        self.removed = False  # rule 11: the broker left the cluster
        self.refused_why: str | None = None  # why its heartbeats say it refused our READY

    @property
    def state(self) -> str:
        """For repr and logs: ACTIVE (announced active), open, refused, silent (reopening
        later) or gone (closed for good)."""
        if not self.open:
            return "silent" if self.reconnect_at is not None else "gone"
        if self.refused:
            return "refused"
        return "ACTIVE" if self.epoch is not None else "open"

    def __repr__(self) -> str:
        return f"<link {self.index} {self.endpoint} {self.state}>"


class WorkerCore:
    """A worker's admission, reply cache, drain, liveness and heartbeats; see the module rules.

    Args:
        clock: monotonic seconds.
        services: the services served, by name.
        brokers: the brokers' endpoints, one link each (named in logs only).
        name: the worker's name in READY.
        internal_errors: how many bugs of its own the loop has contained (heartbeats say it).
        cache: the reply cache (a default one on `clock` if None).
        rng: for the reconnect backoff's jitter (tests fix it).
    """

    def __init__(
        self,
        clock: Clock,
        services: Mapping[str, Service],
        brokers: Sequence[str],
        *,
        name: str = "worker",
        concurrency: int = WORKER_CONCURRENCY,
        prefetch: int = WORKER_PREFETCH,
        weight: float = 1.0,
        info: Mapping[str, Any] | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        liveness: int = LIVENESS,
        drain_timeout: float = DRAIN_TIMEOUT,
        internal_errors: Callable[[], int] = lambda: 0,
        cache: ReplyCache | None = None,
        rng: random.Random | None = None,
        split: bool = False,
    ) -> None:
        self._clock = clock
        self.services = dict(services)
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.drain_timeout = drain_timeout
        self._internal_errors = internal_errors
        self.cache = cache if cache is not None else ReplyCache(clock)
        self.tracker: LivenessTracker[int] = LivenessTracker(clock, heartbeat_interval, liveness)
        self._rng = rng
        self.split = split
        self.links = [_Link(i, ep, rng) for i, ep in enumerate(brokers)]
        self.phase = Phase.RUNNING
        self.calls = 0  # calls started
        self.errors = 0  # replies other than OK from handlers
        self.malformed = Malformed()
        self._announce = (name, {n: s.spec() for n, s in self.services.items()}, weight, dict(info or {}))
        self._ready = self._ready_frames(concurrency + prefetch)
        self._shares: dict[int, list[bytes]] = {}  # rule 11: READY per share, encoded once
        self._disconnect = encode(Disconnect())
        self._running = 0  # handlers started, not finished (sync and async)
        self._threads = 0  # of which sync: each holds a pool thread
        self._waiting: deque[RunHandler] = deque()  # sync calls for a free thread
        self._pooled: set[tuple[str, str]] = set()  # inline methods found slow: pool from now on
        self._leaving_since: float | None = None
        self.highest_epoch = 0  # rule 10
        self.epoch_refused = 0  # calls refused for an older epoch (rule 10)
        self.unauthorized = 0  # calls refused by a method's allow= (rule 12)

    # --- state -----------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Calls admitted and not answered yet: running, or waiting for a thread."""
        return self._running + len(self._waiting)

    @property
    def leaving(self) -> bool:
        return self.phase is not Phase.RUNNING

    @property
    def interval(self) -> float:
        return self.tracker.interval

    def __repr__(self) -> str:
        links = ", ".join(link.state for link in self.links)
        return (f"<WorkerCore {self.phase.name} inflight={self.inflight}/{self.concurrency} "
                f"links=[{links}]>")

    # --- inputs ----------------------------------------------------------------------------

    def add_broker(self, endpoint: str) -> tuple[int, list[Action]]:
        """Rule 11: a broker joined; its link index and the actions that open it."""
        link = _Link(len(self.links), endpoint, self._rng)
        self.links.append(link)
        if self.phase is Phase.STOPPED:
            return link.index, []
        out = self._open(link)
        out.extend(self._reannounce(skip=link))
        return link.index, out

    def remove_broker(self, index: int) -> list[Action]:
        """Rule 11: broker `index` left: its link closes for good; the others get its share."""
        link = self.links[index]
        if link.removed:
            return []
        link.removed = True
        link.reconnect_at = None
        self.tracker.forget(index)
        out: list[Action] = [Log(logging.INFO, f"broker {link.endpoint} left the cluster")]
        if link.open:
            out.extend(self._close(link))
        out.extend(self._reannounce())
        out.extend(self._drain_step(self._clock()))
        return out

    def share(self, link: _Link) -> int:
        """Rule 11: the capacity READY announces on `link`."""
        total = self.concurrency + self.prefetch
        if not self.split:
            return total
        members = [x.index for x in self.links if not x.removed]
        if link.index not in members:
            return total
        n, rank = len(members), members.index(link.index)
        return max(1, total // n + (1 if rank < total % n else 0))

    def start(self) -> list[Action]:
        """Opens every link (each then says READY)."""
        out: list[Action] = []
        for link in self.links:
            out.extend(self._open(link))
        return out

    def frames_received(self, link: int, frames: list[bytes]) -> list[Action]:
        """Frames as they came from broker `link`: decoded here, undecodable ones counted."""
        self._heard(self.links[link])
        try:
            msg = decode_frames(frames)
        except ProtocolError as exc:
            return self._malformed(link, str(exc))
        return self._received(self.links[link], msg)

    def handle(self, event: Event) -> list[Action]:
        if type(event) is CallFinished:  # the hot two first, by exact type
            return self._finished(event.call, event.status, event.body)
        if type(event) is MessageArrived:
            link = self.links[event.link]
            self._heard(link)
            return self._received(link, event.message)
        if type(event) is InlineRan:
            return self._inline_ran(event.call, event.seconds)
        if type(event) is StopRequested:
            return self._stop(event.drain)
        if type(event) is HandshakeEnded:
            return self._handshake(self.links[event.link], event.refused)
        if type(event) is OpenFailed:
            return self._open_failed(self.links[event.link])
        raise TypeError(f"WorkerCore cannot handle {event!r}")

    def tick(self) -> list[Action]:
        """Time-driven work: silent links closed, reopened when due, heartbeats, the drain's end."""
        if self.phase is Phase.STOPPED:
            return []
        now = self._clock()
        out: list[Action] = []
        for index in self.tracker.expired():
            out.extend(self._silent(self.links[index], now))
        interval = self.tracker.interval
        for link in self.links:
            if not link.open:
                if link.reconnect_at is not None and now >= link.reconnect_at:
                    out.append(Log(logging.INFO, f"reconnecting to broker {link.endpoint}"))
                    out.extend(self._open(link))
            elif now - link.last_beat >= interval:
                # every interval, busy or not: the broker's phi-accrual detector reads their rhythm
                link.last_beat = now
                out.append(Send(link.index, encode(Heartbeat(WORKER, self._info()))))
        out.extend(self._drain_step(now))
        return out

    def next_deadline(self) -> float | None:
        """The earliest of: a heartbeat due, a broker's expiry, a reopening, a drain's end
        (None: only a message, a result or a stop can change anything)."""
        if self.phase is Phase.STOPPED:
            return None
        now = self._clock()
        tracker = self.tracker
        due: list[float] = []
        for link in self.links:
            if not link.open:
                if link.reconnect_at is not None:
                    due.append(link.reconnect_at)
                continue
            due.append(link.last_beat + tracker.interval)
            silence = tracker.silence(link.index)
            if silence != float("inf"):
                due.append(now - silence + tracker.timeout)
        if self._leaving_since is not None:
            due.append(self._leaving_since + self.drain_timeout)
            if self.inflight == 0:  # else the grace's end changes nothing: no spinning
                due.append(self._leaving_since + self._drain_grace())
        return min(due, default=None)

    # --- messages ----------------------------------------------------------------------------

    def _heard(self, link: _Link) -> None:
        self.tracker.seen(link.index)
        link.backoff.reset()

    def _malformed(self, link: int, reason: str) -> list[Action]:
        if self.malformed.add(reason):
            return [Log(logging.WARNING, f"dropped malformed message from broker "
                                         f"{self.links[link].endpoint}: {reason}")]
        return []

    def _received(self, link: _Link, msg: Message) -> list[Action]:
        if self.phase is Phase.STOPPED:
            return []
        if type(msg) is WorkerRequest:
            return self._request(link.index, msg)
        if type(msg) is Heartbeat:
            return self._heartbeat(link, msg.info)
        if type(msg) is Disconnect:
            if self.leaving:  # only an answer to ours means anything
                link.acked = True
            return []
        return self._malformed(link.index, f"unexpected {type(msg).__name__}")

    def _heartbeat(self, link: _Link, info: dict[str, Any]) -> list[Action]:
        out = self._follow(info)
        why = info.get("refused")  # our READY was refused (a key's roles, a limit): said once
        why = why[:300] if isinstance(why, str) else None
        if why is not None and why != link.refused_why:
            out.append(Log(logging.ERROR, f"broker {link.endpoint} refused this worker: {why}"))
        link.refused_why = why
        state, epoch = info.get("state"), info.get("epoch")
        link.epoch = epoch if state == "active" and type(epoch) is int and epoch >= 0 else None
        if link.epoch is not None and self.highest_epoch < link.epoch <= MAX_EPOCH:
            self.highest_epoch = link.epoch  # rule 10
        if info.get("register") is True and not self.leaving:  # a leaving worker stays gone
            out.append(Log(logging.INFO, f"broker {link.endpoint} asks this worker to register"))
            out.append(Send(link.index, self._ready_on(link)))
        return out

    def _follow(self, info: dict[str, Any]) -> list[Action]:
        """Adopts the broker's heartbeat settings, so a mismatch cannot make it declare us dead."""
        ms, liveness = info.get("interval_ms"), info.get("liveness")
        if type(ms) is int and type(liveness) is int and 10 <= ms <= 60_000 and 1 <= liveness <= 100:
            if ms / 1000 != self.tracker.interval or liveness != self.tracker.liveness:
                self.tracker.configure(ms / 1000, liveness)
                return [Log(logging.INFO, f"following the broker's heartbeat: {ms} ms x {liveness}")]
        return []

    def _info(self) -> dict[str, Any]:
        """What every heartbeat tells the brokers: our own bugs, and the newest epoch any
        broker now says it is active with (an active broker with a lower one steps down)."""
        epochs = [link.epoch for link in self.links if link.epoch is not None]
        return {"internal_errors": self._internal_errors(), "active_epoch": max(epochs, default=0)}

    # --- admission ---------------------------------------------------------------------------

    def _request(self, link: int, req: WorkerRequest) -> list[Action]:
        key = (req.client_id, req.request_id)
        stamped = req.headers.get(H_EPOCH)
        if stamped is not None:  # rule 10
            epoch = _epoch(stamped)
            if epoch < self.highest_epoch:
                self.epoch_refused += 1
                return [self._reply(link, req, Status.NOT_ACTIVE, pack_error(
                    "NotActive", f"this call carries epoch {epoch}, and this worker has seen "
                    f"{self.highest_epoch}: the broker that sent it is no longer active"))]
            self.highest_epoch = epoch
        if req.headers.get(H_PROBE) is True:
            state, entry = self.cache.probe(key, link)
            if state == NEW:
                return [self._reply(link, req, Status.NOT_SEEN, b"")]
            if state == DONE or state == UNKNOWN:  # UNKNOWN: it ran here, never "not seen"
                return [self._cached(link, req, entry)]
            return []  # RUNNING: the reply will come to this broker too
        svc = self.services.get(req.service)
        method = svc.get(req.method) if svc is not None else None
        if method is None:
            return [self._reply(link, req, Status.METHOD_NOT_FOUND,
                                pack_error("MethodNotFound", f"no method {req.service}.{req.method} here"))]
        if method.allow is not None:  # rule 12
            caller = req.headers.get(H_CALLER)
            if type(caller) is not str or caller not in method.allow:
                return [self._unauthorized(link, req, caller)]
        if req.headers.get(H_BUDGET, 1) <= 0:
            return [self._reply(link, req, Status.TIMEOUT, pack_error("Timeout", "deadline passed"))]
        # the broker says whether it may retry the call; a method declared non-idempotent
        # stays so whatever a header says
        idempotent = req.headers.get(H_IDEMPOTENT) is True and method.idempotent
        state, entry = self.cache.begin(key, link, idempotent)
        if state == DONE or state == UNKNOWN:  # it ran here already: answer, never re-run
            return [self._cached(link, req, entry)]
        if state != NEW:  # RUNNING: its reply will go to this broker too
            return []
        self.calls += 1
        inline = method.inline and (req.service, req.method) not in self._pooled
        budget = req.headers.get(H_BUDGET)
        deadline = self._clock() + budget / 1000 if type(budget) is int else None
        call = RunHandler(link, req, method, inline, deadline)
        if method.is_async or inline:
            self._running += 1
            return [call]
        self._waiting.append(call)
        return self._admit()

    def _unauthorized(self, link: int, req: WorkerRequest, caller: Any) -> SendReply:
        self.unauthorized += 1
        who = (f"caller {caller[:40]} is not among the keys it allows" if type(caller) is str
               else "the broker named no caller (it runs without CURVE keys)")
        return self._reply(link, req, Status.UNAUTHORIZED, pack_error(
            "Unauthorized", f"{req.service}.{req.method} refused this call: {who}"))

    def _admit(self) -> list[Action]:
        """Sync calls waiting for a thread, started while threads are free; one whose budget
        ran out meanwhile is answered TIMEOUT instead (its client has been told already)."""
        out: list[Action] = []
        waiting = self._waiting
        now: float | None = None
        while waiting and self._threads < self.concurrency:
            call = waiting.popleft()
            if call.deadline is not None:
                now = self._clock() if now is None else now
                if now >= call.deadline:
                    self.errors += 1
                    out.extend(self._answer(call, Status.TIMEOUT, EXPIRED_BODY))
                    continue
            self._threads += 1
            self._running += 1
            out.append(call)
        return out

    def _inline_ran(self, call: RunHandler, seconds: float) -> list[Action]:
        key = (call.request.service, call.request.method)
        if seconds <= INLINE_LIMIT or key in self._pooled:
            return []
        self._pooled.add(key)
        return [Log(logging.WARNING, f"{key[0]}.{key[1]} is declared inline but took {seconds * 1000:.0f} ms "
                                     "on the I/O thread, holding heartbeats back: it runs in the "
                                     "thread pool from now on")]

    def _cached(self, link: int, req: WorkerRequest, entry: Entry | None) -> SendReply:
        """The answer the cache holds; CALL_STATE_UNKNOWN when it holds no reply (a tombstone)."""
        if entry is None or entry.status is None:
            return self._reply(link, req, Status.CALL_STATE_UNKNOWN, UNKNOWN_BODY)
        return self._reply(link, req, entry.status, entry.body)

    def _finished(self, call: RunHandler, status: int, body: bytes) -> list[Action]:
        self._running -= 1
        out: list[Action] = []
        if not (call.method.is_async or call.inline):
            self._threads -= 1
            out.extend(self._admit())
        if status != Status.OK:
            self.errors += 1
        out.extend(self._answer(call, status, body))
        out.extend(self._drain_step(self._clock()))
        return out

    def _answer(self, call: RunHandler, status: int, body: bytes) -> list[Action]:
        """The reply, into the cache and to every broker that asked for it meanwhile."""
        req = call.request
        dests = [d for d in self.cache.finish((req.client_id, req.request_id), status, body)
                 if isinstance(d, int)]
        frames = encode(WorkerReply(req.client_id, req.request_id, status, body))
        return [SendReply(self._route(d), frames) for d in dests or [call.link]]

    def _reply(self, link: int, req: WorkerRequest, status: int, body: bytes) -> SendReply:
        return SendReply(self._route(link),
                         encode(WorkerReply(req.client_id, req.request_id, status, body)))

    def _route(self, link: int) -> tuple[int, ...]:
        """The link a call came from, then the others (a broker passes on replies for calls it
        does not hold); closed links are skipped."""
        return tuple(i for i in [link, *(x.index for x in self.links if x.index != link)]
                     if self.links[i].open)

    # --- links -------------------------------------------------------------------------------

    def _open(self, link: _Link) -> list[Action]:
        link.open = True
        link.reconnect_at = None
        link.acked = False
        link.last_beat = self._clock()  # READY (or DISCONNECT) counts as this interval's beat
        self.tracker.seen(link.index)  # a full liveness period to hear from it
        # a leaving worker that reconnects (its broker restarted) says it is leaving: it must
        # not register again and be handed new calls
        return [OpenLink(link.index), Send(link.index, self._disconnect if self.leaving else self._ready_on(link))]

    def _ready_frames(self, capacity: int) -> list[bytes]:
        name, services, weight, info = self._announce
        return encode(Ready(name, services, capacity, weight, info))

    def _ready_on(self, link: _Link) -> list[bytes]:
        """READY for `link`: the whole capacity, or in cluster mode its share (rule 11)."""
        if not self.split:
            return self._ready
        share = self.share(link)
        frames = self._shares.get(share)
        if frames is None:
            frames = self._shares[share] = self._ready_frames(share)
        return frames

    def _reannounce(self, skip: _Link | None = None) -> list[Action]:
        """Rule 11: the set changed, so every open link hears its new share."""
        if not self.split or self.leaving:
            return []
        return [Send(x.index, self._ready_on(x)) for x in self.links
                if x.open and x is not skip and not x.removed]

    def _close(self, link: _Link) -> list[Action]:
        link.open = False
        link.epoch = None  # what it announced no longer holds
        return [CloseLink(link.index)]

    def _open_failed(self, link: _Link) -> list[Action]:
        self.tracker.forget(link.index)
        out = self._close(link)
        if self.phase is not Phase.STOPPED and not link.removed:
            link.reconnect_at = self._clock() + link.backoff.next_delay()
        return out

    def _silent(self, link: _Link, now: float) -> list[Action]:
        if self.leaving and link.acked:
            # it let us go and has nothing more for us: leaving means staying gone
            link.reconnect_at = None
            return [Log(logging.INFO, f"broker {link.endpoint} has let this worker go: not reconnecting"),
                    *self._close(link)]
        delay = link.backoff.next_delay()
        link.reconnect_at = now + delay
        return [Log(logging.WARNING, f"broker {link.endpoint} silent for {self.tracker.timeout:.2f}s: "
                                     f"reconnecting in {delay:.2f}s"),
                *self._close(link)]

    def _handshake(self, link: _Link, refused: str | None) -> list[Action]:
        out: list[Action] = []
        if refused is not None and not link.refused:
            out.append(Log(logging.ERROR, f"broker {link.endpoint} refused this worker: {refused}"))
        elif refused is None and link.refused:
            out.append(Log(logging.INFO, f"broker {link.endpoint} accepted this worker's key"))
        link.refused = refused is not None
        return out

    # --- leaving -----------------------------------------------------------------------------

    def _drain_grace(self) -> float:
        """How long a drained worker waits for the brokers' acknowledgements."""
        return max(DRAIN_GRACE_MIN, 4 * self.tracker.interval)

    def _stop(self, drain: bool) -> list[Action]:
        if self.phase is Phase.STOPPED:
            return []
        if self.phase is Phase.DRAINING or not drain:
            self.phase = Phase.STOPPED
            return [Exit(at_once=True)]
        self.phase = Phase.DRAINING
        now = self._clock()
        self._leaving_since = now
        out: list[Action] = [Log(logging.INFO, f"draining {self.inflight} in-flight call(s), then leaving")]
        out.extend(Send(link.index, self._disconnect) for link in self.links if link.open)
        out.extend(self._drain_step(now))
        return out

    def _drain_step(self, now: float) -> list[Action]:
        """Once draining: Exit when it is time to leave."""
        since = self._leaving_since
        if self.phase is not Phase.DRAINING or since is None:
            return []
        acked = all(link.acked or not link.open for link in self.links)
        if self.inflight == 0 and (acked or now >= since + self._drain_grace()):
            self.phase = Phase.STOPPED
            return [Exit()]
        if now >= since + self.drain_timeout:
            self.phase = Phase.STOPPED
            return [Log(logging.WARNING, f"drain timeout: leaving with {self.inflight} call(s) unfinished"),
                    Exit()]
        return []


def _epoch(v: Any) -> int:
    """Rule 10: an `epoch` header as a number (0 when it is not one; a finite float truncated)."""
    if type(v) is int:
        return v if 0 <= v <= MAX_EPOCH else 0
    if type(v) is float and v == v and 0 <= v <= MAX_EPOCH:
        return int(v)
    return 0

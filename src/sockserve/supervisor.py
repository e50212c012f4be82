"""The supervisor: binds the sockets, keeps worker processes serving them, handles signals.

The worker's side of the fork is ``sockserve.worker``; ``--reload``'s source watcher is
``sockserve.reloader``.

The supervisor keeps the rights it was started with (as nginx's master process and
gunicorn's arbiter do): it binds every socket, reads the TLS key and re-reads it on
reload, and runs no handler code and reads nothing from peers. Workers take the
``--user``/``--group`` identity before they import the handler.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import selectors
import signal
import socket
import ssl
import time
from dataclasses import dataclass

from sockserve import notify
from sockserve.admission import Admission, AdmissionBroker, BrokerLink
from sockserve.binding import Listener, WorkerSockets
from sockserve.importer import (
    HandlerRef,
    StartInterrupted,
    check_handler_in_child,
    check_kind,
)
from sockserve.metrics import Metrics, bind_metrics, log_metrics_url
from sockserve.process import SUPERVISOR_SIGNALS, Identity, signal_name
from sockserve.reloader import SCAN_INTERVAL, SourceWatcher
from sockserve.runner import IMMEDIATE_STOP, load_before_drop, load_tls
from sockserve.settings import Settings, SettingsError
from sockserve.worker import Worker, WorkerProcess, heartbeat_interval

__all__ = ["Supervisor", "SupervisorError"]

logger = logging.getLogger("sockserve.supervisor")

CRASH_WINDOW = 5.0  # a worker dying sooner than this after it started counts as a crash
FIRST_BACKOFF = 0.1  # a slot's second crash in a row waits this long, doubling each time
MAX_BACKOFF = 10.0  # ... up to this
ALONE_BACKOFF = 1.0  # ... but no longer than this while no other worker serves
STOP_MARGIN = 5.0  # after the graceful timeout, workers get this long before SIGKILL
RELOAD_TIMEOUT = 60.0  # new workers must all serve within this, or the reload is abandoned
BOOT_FAILED = 2  # the exit status when the first workers cannot start


@dataclass
class _Slot:
    """One worker place: its own restart back-off, so one crashing worker delays no other."""

    crashes: int = 0  # quick deaths in a row
    respawn_at: float = 0.0


class Supervisor:
    """Binds the sockets, keeps ``workers`` processes serving them, and handles signals.

    TERM/INT: graceful stop of every worker (a second INT: at once); HUP: start a new
    generation of workers, then stop the old one once the new one serves; TTIN/TTOU: one
    worker more or fewer. The main loop does the work; signal handlers only queue the
    signal (as gunicorn's arbiter).
    """

    _handled = SUPERVISOR_SIGNALS

    def __init__(self, handler: HandlerRef, settings: Settings) -> None:
        self.handler = handler
        self.settings = settings
        self.identity = Identity.of(settings)
        self.slots = [_Slot() for _ in range(settings.workers)]
        self.children: dict[int, WorkerProcess] = {}
        self.generation = 0  # the generation serving
        self._generations = 0
        self.reload_generation: int | None = None  # the one starting, during a reload
        self.reload_deadline = 0.0
        self.reload_ssl: ssl.SSLContext | None = None
        self.reload_pending: str | None = None  # asked for while a reload was under way
        self.signals: list[int] = []
        self.sockets = WorkerSockets(settings, self._owner)
        self.stopping = False
        self.booted = False
        self.exit_code = 0
        self.restarts = 0
        self.ssl_context: ssl.SSLContext | None = None
        self.metrics: tuple[Metrics, Listener] | None = None
        self.sources: SourceWatcher | None = None
        # Per-client limits hold for the whole server: the one table lives here.
        admission = Admission(settings.max_connections_per_ip, settings.connection_rate_per_ip)
        self.broker = AdmissionBroker(admission) if admission.enabled else None
        self._last_watch = time.monotonic()
        self._next_scan = 0.0

    # -- setup ---------------------------------------------------------------------------

    @property
    def _owner(self) -> tuple[int, int] | None:
        return self.identity.owner if self.identity else None

    def _prepare(self) -> None:
        """Everything before the first worker: TLS, sockets, the handler check, metrics."""
        self.ssl_context = load_tls(self.settings)
        self.sockets.bind()
        try:
            listeners = self.sockets.bound
            if isinstance(self.handler, str):
                files = check_handler_in_child(self.handler, self.identity, listeners)
            else:
                check_kind(self.handler, listeners)
                files = []
            if self.settings.reload:
                self.sources = SourceWatcher(files)
                if not files:
                    logger.warning("--reload: no handler module under the current directory")
            if self.settings.metrics:
                self._start_metrics()
            load_before_drop(self.settings)
        except BaseException:
            self.sockets.close()
            raise
        for listener in listeners:
            logger.info("listening on %s", listener.describe())
        if self.metrics is not None:
            log_metrics_url(self.metrics[1])
        if self.identity is not None:
            logger.info(
                "workers run as uid %d gid %d",
                os.getuid() if self.identity.uid == -1 else self.identity.uid,
                os.getgid() if self.identity.gid == -1 else self.identity.gid,
            )

    def _start_metrics(self) -> None:
        """Metrics in multiprocess mode (one file per worker), on a socket every worker
        serves."""
        metrics = Metrics.for_workers(self._owner)
        try:
            self.metrics = (metrics, bind_metrics(self.settings))
        except BaseException:
            metrics.remove_files()
            raise

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._alive_r = self._alive_w = -1
        # Signals are queued from before the "listening on" lines: one sent as soon as
        # they appear is acted on once the loop runs, never the default action (death).
        old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno())
        previous = {sig: signal.signal(sig, self._queue_signal) for sig in self._handled}
        try:
            self._prepare()
        except StartInterrupted as exc:
            logger.info("%s: stopped while the handler was being checked", signal_name(exc.signum))
        else:
            self._serve()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._wake_r.close()
            self._wake_w.close()
            for fd in (self._alive_r, self._alive_w):
                if fd >= 0:
                    os.close(fd)
            self.sockets.close()
            if self.metrics is not None:
                self.metrics[1].close()
                self.metrics[0].remove_files()
        logger.info("supervisor stopped")
        if self.exit_code:
            raise SupervisorError(self.exit_code)

    def _serve(self) -> None:
        """The main loop: until every worker is gone after a stop."""
        self._alive_r, self._alive_w = os.pipe()  # workers see EOF if the supervisor dies
        logger.info("supervisor %d starting %d worker(s)", os.getpid(), len(self.slots))
        with selectors.DefaultSelector() as selector:
            self.selector = selector
            selector.register(self._wake_r, selectors.EVENT_READ)
            self._spawn_missing()
            while self.children or not self.stopping:
                for key, events in selector.select(self._next_timeout()):
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            while self._wake_r.recv(4096):
                                pass
                    elif isinstance(key.data, BrokerLink):
                        key.data.ready(events)
                    else:
                        self._read_beats(key.data)
                self._handle_signals()
                self._reap()
                self._tick()

    def _queue_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def _next_timeout(self) -> float | None:
        now = time.monotonic()
        deadlines = [child.kill_at for child in self.children.values()]
        if not self.stopping:
            deadlines += [slot.respawn_at for slot in self.slots if slot.respawn_at > now]
        if self.reload_generation is not None:
            deadlines.append(self.reload_deadline)
        if self.sources is not None and not self.stopping:
            deadlines.append(self._next_scan)
        if self.settings.worker_timeout:
            deadlines.append(self._last_watch + heartbeat_interval(self.settings))
        deadline = min(deadlines, default=math.inf)
        return None if deadline == math.inf else max(0.0, deadline - now)

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._stop(signum)
            elif self.stopping:
                continue
            elif signum == signal.SIGHUP:
                self._reload("SIGHUP")
            elif signum == signal.SIGTTIN:
                self.slots.append(_Slot())
                logger.info("SIGTTIN: %d worker(s)", len(self.slots))
                if self.reload_generation is not None:
                    self._spawn(len(self.slots) - 1, self.reload_generation)
                self._spawn_missing()
            elif signum == signal.SIGTTOU:
                if len(self.slots) == 1:
                    logger.info("SIGTTOU: ignored, already at 1 worker")
                    continue
                self.slots.pop()
                logger.info("SIGTTOU: %d worker(s)", len(self.slots))
                for child in self._live():
                    if child.slot == len(self.slots):
                        self._stop_child(child, signal.SIGTERM)
                if self.reload_generation is not None:
                    self._check_reload()
            elif signum == signal.SIGUSR1:
                logger.info("SIGUSR1: ignored (logs go to standard error: no file to reopen)")

    def _stop(self, signum: int, why: str = "") -> None:
        now = time.monotonic()
        if not self.stopping:
            self.stopping = True
            logger.info(
                "%s: stopping %d worker(s) gracefully (up to %.1f s)%s",
                why or signal.Signals(signum).name,
                len(self.children),
                self.settings.graceful_timeout,
                "; Ctrl-C again stops at once" if signum == signal.SIGINT else "",
            )
            notify.notify("STOPPING=1")
            # Close our copies first: the last worker to drain its backlog closes the socket.
            for listener in self.sockets.shared:
                listener.refuse_new()
            self.sockets.close()
            for child in list(self.children.values()):
                self._stop_child(child, signal.SIGTERM)
        elif signum == signal.SIGINT:
            logger.info("SIGINT again: stopping workers now")
            for child in list(self.children.values()):
                self._stop_child(child, signal.SIGINT, now + 2 * IMMEDIATE_STOP)

    # -- workers -------------------------------------------------------------------------

    def _live(self) -> list[WorkerProcess]:
        return [c for c in self.children.values() if not c.stopping]

    def _spawn_missing(self) -> None:
        """A worker of the serving generation in every slot whose back-off is over."""
        if self.stopping:
            return
        now = time.monotonic()
        filled = {c.slot for c in self._live() if c.generation == self.generation}
        for index, slot in enumerate(self.slots):
            if index not in filled and now >= slot.respawn_at:
                self._spawn(index, self.generation)

    def _spawn(self, slot: int, generation: int) -> bool:
        """Start a worker in ``slot``. False if the system would not (no descriptors or
        processes left): that counts as a crash of the slot, or fails the reload."""
        try:
            self._fork_worker(slot, generation)
        except OSError as exc:
            logger.error("cannot start a worker: %s", exc)
            if generation == self.reload_generation:
                self._reload_failed(f"cannot start a worker: {exc}")
            else:
                delay = max(self._back_off(self.slots[slot], quick=True), FIRST_BACKOFF)
                self.slots[slot].respawn_at = time.monotonic() + delay
            return False
        return True

    def _fork_worker(self, slot: int, generation: int) -> None:
        ssl_context = self.reload_ssl if generation == self.reload_generation else None
        ssl_context = ssl_context or self.ssl_context
        with contextlib.ExitStack() as undo:  # what was made, should a later step fail
            listeners = self.sockets.for_worker()
            for listener in listeners:
                if listener not in self.sockets.shared:  # with reuse-port: this worker's own
                    undo.callback(listener.sock.close)
            beat_r, beat_w = os.pipe()
            undo.callback(os.close, beat_r)
            undo.callback(os.close, beat_w)
            link = child_link = None
            if self.broker is not None:
                link, child_link = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                undo.enter_context(link)
                undo.enter_context(child_link)
            worker = Worker(
                self.handler,
                self.settings,
                listeners,
                beat_fd=beat_w,
                alive_fd=self._alive_r,
                identity=self.identity,
                ssl_context=ssl_context,
                metrics=self.metrics,
                admission_link=child_link,
            )
            pid = worker.start(self._handled, lambda: self._let_go(beat_r, link))
            undo.pop_all()
        os.close(beat_w)
        for listener in listeners:
            if listener not in self.sockets.shared:
                listener.sock.close()
        now = time.monotonic()
        child = WorkerProcess(pid, slot, generation, beat_r, now, last_beat=now)
        self.children[pid] = child
        self.selector.register(beat_r, selectors.EVENT_READ, child)
        if link is not None and child_link is not None and self.broker is not None:
            child_link.close()
            child.link = BrokerLink(link, pid, self.broker, self.selector)
        logger.info("started worker %d", pid)

    def _let_go(self, beat_r: int, link: socket.socket | None) -> None:
        """In a new worker: close what only the supervisor uses, its ends of this worker's
        pipes included."""
        os.close(beat_r)
        if link is not None:
            link.close()
        os.close(self._alive_w)
        self._wake_r.close()
        self._wake_w.close()
        for listener in self.sockets.shared + ([self.metrics[1]] if self.metrics else []):
            listener.shared = True  # the supervisor serves it on after this worker stops
        for child in self.children.values():
            if child.beat_fd >= 0:
                os.close(child.beat_fd)
            if child.link is not None:  # not unregistered: the epoll is the supervisor's
                child.link.sock.close()
        self.selector.close()

    def _read_beats(self, child: WorkerProcess) -> None:
        """READY (or FAILED and why) first, then heartbeats; EOF once the worker is gone."""
        try:
            data = os.read(child.beat_fd, 4096)
        except OSError:
            data = b""
        if not data:
            self._close_beats(child)
        elif child.heard(data, time.monotonic()):
            self._ready(child)

    def _close_beats(self, child: WorkerProcess) -> None:
        if child.beat_fd >= 0:
            self.selector.unregister(child.beat_fd)
            os.close(child.beat_fd)
            child.beat_fd = -1

    def _ready(self, child: WorkerProcess) -> None:
        if not self.booted:
            self.booted = True
            notify.notify("READY=1", f"MAINPID={os.getpid()}")
        if self.reload_generation is not None:
            self._check_reload()

    def _drop_link(self, worker: WorkerProcess) -> None:
        """The worker exited: its connections are gone, and so is its share of the table."""
        if worker.link is not None:
            worker.link.close()
            worker.link = None
        if self.broker is not None:
            self.broker.worker_gone(worker.pid)

    def _stop_child(self, child: WorkerProcess, signum: int, kill_at: float | None = None) -> None:
        """Ask ``child`` to stop; SIGKILL it if it still runs at ``kill_at``."""
        if kill_at is None:
            kill_at = time.monotonic() + self.settings.graceful_timeout + STOP_MARGIN
        child.stopping = True
        child.kill_at = min(child.kill_at, kill_at)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signum)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.beat_fd >= 0:  # what it wrote last (why it failed) is still there
                os.set_blocking(child.beat_fd, False)
                while child.beat_fd >= 0:
                    self._read_beats(child)
            self._drop_link(child)
            if self.metrics is not None:
                self.metrics[0].worker_exited(pid)
            self._exited(child, os.waitstatus_to_exitcode(status))

    def _exited(self, child: WorkerProcess, code: int) -> None:
        cause = f"signal {signal_name(-code)}" if code < 0 else f"exit code {code}"
        if child.stopping:
            logger.info("worker %d stopped (%s)", child.pid, cause)
            return
        if child.generation == self.reload_generation:
            if child.failure:
                self._reload_failed(child.failure)
            else:
                self._reload_failed(f"new worker {child.pid} died ({cause})")
            return
        if not child.ready and not self.booted:
            logger.error(
                "worker %d could not start: %s; stopping", child.pid, child.failure or cause
            )
            self.exit_code = BOOT_FAILED
            self._stop(signal.SIGTERM, "no worker could start")
            return
        self._restart(child, cause)

    def _restart(self, child: WorkerProcess, cause: str) -> None:
        """Replace a worker that died, with back-off for its slot if it keeps dying."""
        self.restarts += 1
        if self.metrics is not None:
            self.metrics[0].worker_restarted()
        if child.slot >= len(self.slots):  # its slot went away with SIGTTOU
            logger.error("worker %d died (%s)", child.pid, cause)
            return
        now = time.monotonic()
        ran = now - child.started
        delay = self._back_off(self.slots[child.slot], quick=ran < CRASH_WINDOW)
        self.slots[child.slot].respawn_at = now + delay
        reason = f": {child.failure}" if child.failure else ""
        if delay:
            logger.error(
                "worker %d died (%s)%s %.1f s after it started; starting a new one in %.1f s",
                child.pid,
                cause,
                reason,
                ran,
                delay,
            )
        else:
            logger.error("worker %d died (%s)%s; starting a new one", child.pid, cause, reason)
        self._spawn_missing()

    def _back_off(self, slot: _Slot, quick: bool) -> float:
        """How long ``slot`` waits before its next worker, after one died (``quick``: soon
        after it started, or it could not start at all)."""
        slot.crashes = slot.crashes + 1 if quick else 0
        delay = 0.0 if slot.crashes <= 1 else FIRST_BACKOFF * 2 ** (slot.crashes - 2)
        delay = min(delay, MAX_BACKOFF)
        if not any(c.ready for c in self._live()):  # nobody serves: come back soon
            delay = min(delay, ALONE_BACKOFF)
        return delay

    # -- reload --------------------------------------------------------------------------

    def _reload(self, why: str) -> None:
        if self.reload_generation is not None:
            logger.info("%s: a reload is under way; another one follows it", why)
            self.reload_pending = why
            return
        try:
            self.reload_ssl = load_tls(self.settings)
        except SettingsError as exc:
            logger.error("%s: reload failed: %s; keeping the old workers", why, exc)
            return
        logger.info("%s: starting %d new worker(s)", why, len(self.slots))
        notify.reloading()
        self._generations += 1
        self.reload_generation = self._generations
        self.reload_deadline = time.monotonic() + RELOAD_TIMEOUT
        for index in range(len(self.slots)):
            if not self._spawn(index, self.reload_generation):
                return

    def _check_reload(self) -> None:
        """Once a new worker serves in every slot, the old ones stop."""
        new = [c for c in self._live() if c.generation == self.reload_generation]
        if not {c.slot for c in new if c.ready} >= set(range(len(self.slots))):
            return
        for child in self._live():
            if child.generation != self.reload_generation:
                self._stop_child(child, signal.SIGTERM)
        assert self.reload_generation is not None
        self.generation = self.reload_generation
        self.ssl_context = self.reload_ssl
        self.reload_generation = None
        logger.info("reload done: old workers are finishing their connections")
        notify.notify("READY=1")
        self._next_reload()

    def _reload_failed(self, reason: str) -> None:
        logger.error("reload failed: %s; keeping the old workers", reason)
        for child in self._live():
            if child.generation == self.reload_generation:
                self._stop_child(child, signal.SIGTERM)
        self.reload_generation = None
        self.reload_ssl = None
        notify.notify("READY=1")
        self._next_reload()

    def _next_reload(self) -> None:
        if self.reload_pending is not None and not self.stopping:
            why, self.reload_pending = self.reload_pending, None
            self._reload(why)

    def _tick(self) -> None:
        now = time.monotonic()
        if self.settings.worker_timeout:
            self._watch_workers(now)
        for child in self.children.values():
            if now >= child.kill_at:
                logger.warning("worker %d did not stop in time; killing it", child.pid)
                child.kill_at = math.inf  # one kill; _reap sees it go
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
        if self.reload_generation is not None and now >= self.reload_deadline:
            self._reload_failed(f"new workers did not start within {RELOAD_TIMEOUT:.0f} s")
        if self.sources is not None and not self.stopping and now >= self._next_scan:
            self._next_scan = now + SCAN_INTERVAL
            if self.sources.changed():
                self._reload("source change")
        self._spawn_missing()

    def _watch_workers(self, now: float) -> None:
        """Kill workers whose loop has not written a heartbeat for ``worker_timeout``, and
        those not serving that long after they started (an import that hangs)."""
        timeout = self.settings.worker_timeout
        if now - self._last_watch > timeout / 2:
            # We were not running either (the process group stopped with Ctrl-Z, a paused
            # VM): the workers' silence says nothing, so start counting afresh.
            for child in self.children.values():
                child.last_beat = max(child.last_beat, now)
        self._last_watch = now
        for child in self.children.values():
            if now - child.last_beat < timeout:
                continue
            if child.ready:
                logger.error(
                    "worker %d unresponsive for %.1f s (its event loop is blocked); killing it",
                    child.pid,
                    now - child.last_beat,
                )
            elif not child.failure:
                child.failure = f"not serving {now - child.started:.1f} s after it started"
                logger.error(
                    "worker %d %s (--worker-timeout); killing it", child.pid, child.failure
                )
            child.last_beat = now  # one kill; _reap replaces it
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)


class SupervisorError(SystemExit):
    """The supervisor stopped because workers could not run; ``code`` is the exit status."""

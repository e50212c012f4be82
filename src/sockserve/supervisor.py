"""The supervisor: binds the sockets, keeps worker processes serving them, handles signals.

The worker's side of the fork is ``sockserve.worker``; ``--reload``'s source watcher is
``sockserve.reloader``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import selectors
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import NoReturn

from sockserve import binding, notify
from sockserve.admission import Admission, AdmissionBroker
from sockserve.binding import Listener, addresses_of, bind_all
from sockserve.observability import Metrics, log_metrics_url
from sockserve.reloader import SCAN_INTERVAL, SourceWatcher
from sockserve.runner import HandlerRef, drop_privileges
from sockserve.settings import Settings
from sockserve.worker import BOOT_ERROR, Worker, heartbeat_interval

__all__ = ["Supervisor", "SupervisorError"]

logger = logging.getLogger("sockserve.supervisor")

CRASH_WINDOW = 5.0  # a worker dying sooner than this after it started counts as a crash
MAX_BACKOFF = 30.0
STOP_MARGIN = 5.0  # after the graceful timeout, workers get this long before SIGKILL
RELOAD_TIMEOUT = 60.0  # new workers must all serve within this, or the reload is abandoned
LINK_SEND_WAIT = 1.0  # how long an admission answer may wait for room in a worker's socket


@dataclass(eq=False)
class _Child:
    """The supervisor's record of one worker process."""

    pid: int
    generation: int
    beat_fd: int  # the worker writes a byte here once it serves, then every heartbeat
    started: float
    link: socket.socket | None = None  # the worker asks the per-client table over this
    ready: bool = False
    stopping: bool = False
    last_beat: float = 0.0


class Supervisor:
    """Binds the sockets, keeps ``workers`` processes serving them, and handles signals.

    TERM/INT: graceful stop of every worker; HUP: start a new generation of workers, then
    stop the old one once the new one serves; TTIN/TTOU: one worker more or fewer. The
    main loop does the work; signal handlers only queue the signal (as gunicorn's arbiter).
    """

    def __init__(self, handler: HandlerRef, settings: Settings) -> None:
        self.handler = handler
        self.settings = settings
        self.target = settings.workers
        self.workers: dict[int, _Child] = {}
        self.generation = 0
        self.signals: list[int] = []
        self.shared: list[Listener] = []  # inherited by every worker
        self.reuse_addresses: list[binding.Address] = []  # bound afresh for each worker
        self.first_reuse: list[Listener] = []  # the first worker's, bound at start
        self.stopping = False
        self.stop_deadline = 0.0
        self.crashes = 0
        self.respawn_at = 0.0
        self.reload_generation: int | None = None
        self.reload_deadline = 0.0
        self.booted = False
        self.exit_code = 0
        self.restarts = 0
        self.metrics: tuple[Metrics, Listener] | None = None
        self.metrics_dir = ""
        # Per-client limits hold for the whole server: the one table lives here.
        admission = Admission(settings.max_connections_per_ip, settings.connection_rate_per_ip)
        self.broker = AdmissionBroker(admission) if admission.enabled else None
        self.sources = SourceWatcher(os.getcwd())
        self._last_watch = time.monotonic()
        self._next_scan = 0.0

    # -- setup ---------------------------------------------------------------------------

    def _bind(self) -> None:
        """Bind everything once; with reuse-port, note the real ports to bind per worker."""
        addresses = addresses_of(self.settings)
        if not self.settings.reuse_port:
            self.shared = bind_all(self.settings, addresses)
            return
        try:
            for address in addresses:
                listeners = bind_all(self.settings, [address])
                if isinstance(address, (binding.TCPAddress, binding.UDPAddress)):
                    port = listeners[0].sock.getsockname()[1]
                    self.reuse_addresses.append(dataclasses.replace(address, port=port))
                    self.first_reuse.extend(listeners)
                else:
                    self.shared.extend(listeners)
        except BaseException:
            for listener in self.shared + self.first_reuse:
                listener.close()
            raise

    def _worker_listeners(self) -> list[Listener]:
        """Shared sockets, plus (with reuse-port) this worker's own SO_REUSEPORT ones."""
        if not self.settings.reuse_port:
            return self.shared
        if self.first_reuse:
            first, self.first_reuse = self.first_reuse, []
            return self.shared + first
        return self.shared + bind_all(self.settings, self.reuse_addresses)

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> None:
        self._bind()
        for listener in self.shared + self.first_reuse:
            logger.info("listening on %s", listener.describe())
        if self.settings.metrics:
            self._start_metrics()
        drop_privileges(self.settings.user, self.settings.group, self.shared)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._alive_r, self._alive_w = os.pipe()  # workers see EOF if the supervisor dies
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        handled = (
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGHUP,
            signal.SIGCHLD,
            signal.SIGTTIN,
            signal.SIGTTOU,
        )
        previous = {sig: signal.signal(sig, self._queue_signal) for sig in handled}
        logger.info("supervisor %d starting %d worker(s)", os.getpid(), self.target)
        try:
            with selectors.DefaultSelector() as selector:
                self.selector = selector
                selector.register(wake_r, selectors.EVENT_READ)
                self._spawn_missing()
                while self.workers or not self.stopping:
                    timeout = self._next_timeout()
                    for key, _ in selector.select(timeout):
                        if key.fileobj is wake_r:
                            with contextlib.suppress(OSError):
                                while wake_r.recv(4096):
                                    pass
                        elif key.fileobj is key.data.link:
                            self._admission_event(key.data)
                        else:
                            self._beat_event(key.data)
                    self._handle_signals()
                    self._reap()
                    self._tick()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()
            os.close(self._alive_r)
            os.close(self._alive_w)
            for listener in self.shared:
                listener.close()
            if self.metrics is not None:
                self.metrics[1].close()
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
        logger.info("supervisor stopped")
        if self.exit_code:
            raise SupervisorError(self.exit_code)

    def _start_metrics(self) -> None:
        """Metrics in multiprocess mode (one file per worker), on a socket every worker serves."""
        assert self.settings.metrics is not None
        self.metrics_dir = tempfile.mkdtemp(prefix="sockserve-metrics-")
        try:
            metrics = Metrics(self.metrics_dir)
            address = binding.parse_address(self.settings.metrics)
            listener = binding.bind(address, backlog=128)[0]
        except BaseException:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            raise
        self.metrics = (metrics, listener)
        log_metrics_url(listener)

    def _queue_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def _next_timeout(self) -> float | None:
        now = time.monotonic()
        deadlines = []
        if self.stopping:
            deadlines.append(self.stop_deadline)
        if self.respawn_at and len(self._live()) < self.target and not self.stopping:
            deadlines.append(self.respawn_at)
        if self.reload_generation is not None:
            deadlines.append(self.reload_deadline)
        if self.settings.reload and not self.stopping:
            deadlines.append(self._next_scan)
        if self.settings.worker_timeout:
            deadlines.append(self._last_watch + heartbeat_interval(self.settings))
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._stop(signum)
            elif signum == signal.SIGHUP and not self.stopping:
                self._reload("SIGHUP")
            elif signum == signal.SIGTTIN and not self.stopping:
                self.target += 1
                logger.info("SIGTTIN: %d worker(s)", self.target)
                self._spawn_missing()
            elif signum == signal.SIGTTOU and not self.stopping and self.target > 1:
                self.target -= 1
                logger.info("SIGTTOU: %d worker(s)", self.target)
                oldest = min(self._live(), key=lambda w: w.started, default=None)
                if oldest is not None:
                    self._stop_worker(oldest, signal.SIGTERM)

    def _stop(self, signum: int) -> None:
        if not self.stopping:
            logger.info(
                "%s: stopping %d worker(s) gracefully",
                signal.Signals(signum).name,
                len(self.workers),
            )
            self.stopping = True
            notify.notify("STOPPING=1")
            self.stop_deadline = time.monotonic() + self.settings.graceful_timeout + STOP_MARGIN
            # Close our copies first: the last worker to drain its backlog closes the socket.
            for listener in self.shared:
                listener.refuse_new()
                listener.close()
            self.shared = []
        elif signum == signal.SIGINT:
            logger.info("SIGINT again: stopping workers now")
        for worker in self.workers.values():
            worker.stopping = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    # -- workers -------------------------------------------------------------------------

    def _live(self) -> list[_Child]:
        return [w for w in self.workers.values() if not w.stopping]

    def _current(self) -> list[_Child]:
        return [w for w in self._live() if w.generation == self.generation]

    def _spawn_missing(self) -> None:
        if self.stopping or self.reload_generation is not None:
            return
        if self.respawn_at and time.monotonic() < self.respawn_at:
            return
        while len(self._current()) < self.target:
            self._spawn()

    def _spawn(self) -> None:
        listeners = self._worker_listeners()
        beat_r, beat_w = os.pipe()
        link = child_link = None
        if self.broker is not None:
            link, child_link = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            os.close(beat_r)
            if link is not None:
                link.close()
            self._become_worker(listeners, beat_w, child_link)
        os.close(beat_w)
        if self.settings.reuse_port:
            for listener in listeners:
                if listener not in self.shared:
                    listener.sock.close()
        worker = _Child(pid, self.generation, beat_r, time.monotonic())
        self.workers[pid] = worker
        self.selector.register(beat_r, selectors.EVENT_READ, worker)
        if link is not None and child_link is not None:
            child_link.close()
            link.setblocking(False)
            worker.link = link
            self.selector.register(link, selectors.EVENT_READ, worker)
        logger.info("started worker %d", pid)

    def _become_worker(
        self, listeners: list[Listener], beat_w: int, link: socket.socket | None
    ) -> NoReturn:
        """In the child: let go of the supervisor's descriptors, then serve as a worker."""
        Worker.reset_signals()
        os.close(self._alive_w)
        for listener in self.shared:
            listener.shared = True  # the supervisor serves it on after this worker stops
        for child in self.workers.values():
            if child.beat_fd >= 0:
                os.close(child.beat_fd)
            if child.link is not None:
                child.link.close()
        self.selector.close()
        worker = Worker(
            self.handler,
            self.settings,
            listeners,
            beat_fd=beat_w,
            alive_fd=self._alive_r,
            metrics=self.metrics,
            admission_link=link,
        )
        worker.run()

    def _beat_event(self, worker: _Child) -> None:
        """The worker is ready (its first byte) or its loop is alive (every later one)."""
        try:
            data = os.read(worker.beat_fd, 4096)
        except OSError:
            data = b""
        if not data:  # the worker is gone or never got going; _reap tells which
            self.selector.unregister(worker.beat_fd)
            os.close(worker.beat_fd)
            worker.beat_fd = -1
            return
        worker.last_beat = time.monotonic()
        if not worker.ready:
            worker.ready = True
            if not self.booted:
                notify.notify("READY=1", f"MAINPID={os.getpid()}")
            self.booted = True
            if self.reload_generation is not None:
                self._check_reload()

    def _admission_event(self, worker: _Child) -> None:
        """A worker asks whether a client may connect, or says a connection closed."""
        link, broker = worker.link, self.broker
        assert link is not None and broker is not None
        while True:
            try:
                message = link.recv(256)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:  # the worker is gone
                self._drop_link(worker)
                return
            answer = broker.handle(worker.pid, message, time.monotonic())
            if answer is not None:
                try:
                    link.send(answer)
                except BlockingIOError:  # the worker is not reading: wait a little
                    select.select([], [link], [], LINK_SEND_WAIT)
                    try:
                        link.send(answer)
                    except OSError as exc:
                        logger.error("worker %d: admission answer lost: %s", worker.pid, exc)
                except OSError:
                    pass  # gone: the EOF that follows drops the link

    def _drop_link(self, worker: _Child) -> None:
        """The worker exited: its connections are gone, and so is its share of the table."""
        if worker.link is not None:
            self.selector.unregister(worker.link)
            worker.link.close()
            worker.link = None
        if self.broker is not None:
            self.broker.worker_gone(worker.pid)

    def _stop_worker(self, worker: _Child, signum: int) -> None:
        worker.stopping = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signum)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            if worker.beat_fd >= 0:
                self.selector.unregister(worker.beat_fd)
                os.close(worker.beat_fd)
            self._drop_link(worker)
            code = os.waitstatus_to_exitcode(status)
            if self.metrics is not None:
                self.metrics[0].worker_exited(pid)
            self._worker_exited(worker, code)

    def _worker_exited(self, worker: _Child, code: int) -> None:
        cause = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if worker.stopping:
            logger.info("worker %d stopped (%s)", worker.pid, cause)
            return
        if code == BOOT_ERROR and not worker.ready:
            if self.reload_generation == worker.generation:
                logger.error("reload failed: new workers cannot boot; keeping the old ones")
                self._abort_reload()
                notify.notify("READY=1")
                return
            if not self.booted:
                logger.error("worker failed to boot; stopping")
                self.exit_code = 2
                self._stop(signal.SIGTERM)
                return
        logger.error("worker %d died (%s); starting a new one", worker.pid, cause)
        self.restarts += 1
        if self.metrics is not None:
            self.metrics[0].worker_restarted()
        if time.monotonic() - worker.started < CRASH_WINDOW:
            self.crashes += 1
            delay = min(MAX_BACKOFF, 0.1 * 2 ** min(self.crashes, 10))
            self.respawn_at = time.monotonic() + delay
            logger.warning("worker crashed soon after start; next start in %.1f s", delay)
        else:
            self.crashes = 0
            self.respawn_at = 0.0
        self._spawn_missing()

    # -- reload --------------------------------------------------------------------------

    def _reload(self, why: str) -> None:
        if self.reload_generation is not None:
            logger.info("%s: a reload is already under way", why)
            return
        logger.info("%s: starting %d new worker(s)", why, self.target)
        notify.reloading()
        self.generation += 1
        self.reload_generation = self.generation
        self.reload_deadline = time.monotonic() + RELOAD_TIMEOUT
        for _ in range(self.target):
            self._spawn()

    def _check_reload(self) -> None:
        new = [w for w in self._live() if w.generation == self.reload_generation]
        if len(new) >= self.target and all(w.ready for w in new):
            for worker in self._live():
                if worker.generation != self.reload_generation:
                    self._stop_worker(worker, signal.SIGTERM)
            logger.info("reload done: old workers are finishing their connections")
            self.reload_generation = None
            notify.notify("READY=1")

    def _abort_reload(self) -> None:
        for worker in self._live():
            if worker.generation == self.reload_generation:
                self._stop_worker(worker, signal.SIGKILL)
        self.generation -= 1
        self.reload_generation = None

    def _tick(self) -> None:
        now = time.monotonic()
        if self.settings.worker_timeout:
            self._watch_workers(now)
        if self.stopping and now >= self.stop_deadline:
            for worker in self.workers.values():
                logger.warning("worker %d did not stop in time; killing it", worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
            self.stop_deadline = now + STOP_MARGIN
        if self.reload_generation is not None and now >= self.reload_deadline:
            logger.error("reload timed out; keeping the old workers")
            self._abort_reload()
            notify.notify("READY=1")
        if self.settings.reload and not self.stopping and now >= self._next_scan:
            self._next_scan = now + SCAN_INTERVAL
            if self.sources.changed():
                self._reload("source change")
        self._spawn_missing()

    def _watch_workers(self, now: float) -> None:
        """Kill workers whose loop has not written a heartbeat for ``worker_timeout``."""
        timeout = self.settings.worker_timeout
        if now - self._last_watch > timeout / 2:
            # We were not running either (the process group stopped with Ctrl-Z, a paused
            # VM): the workers' silence says nothing, so start counting afresh.
            for worker in self.workers.values():
                worker.last_beat = max(worker.last_beat, now)
        self._last_watch = now
        for worker in self.workers.values():
            if worker.ready and now - worker.last_beat >= timeout:
                logger.error(
                    "worker %d unresponsive for %.1f s (its event loop is blocked); killing it",
                    worker.pid,
                    now - worker.last_beat,
                )
                worker.last_beat = now  # one kill; _reap replaces it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)


class SupervisorError(SystemExit):
    """The supervisor stopped because workers could not run; ``code`` is the exit status."""

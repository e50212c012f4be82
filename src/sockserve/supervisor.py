"""Running a server: the event loop, signals, privileges; worker processes for workers > 1."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import importlib
import logging
import os
import pwd
import resource
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from sockserve import binding, notify
from sockserve.binding import Listener
from sockserve.observability import Metrics
from sockserve.server import (
    HandlerKindError,
    Server,
    addresses_of,
    bind_all,
    handler_kind,
    log_metrics_url,
)
from sockserve.settings import Settings, SettingsError, describe

__all__ = ["HandlerImportError", "load_handler", "new_event_loop", "run_server", "serve"]

logger = logging.getLogger("sockserve.supervisor")


def new_event_loop(name: str) -> asyncio.AbstractEventLoop:
    """uvloop for ``uvloop`` (and for ``auto`` when importable), else asyncio's loop."""
    if name in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise SettingsError(f"{describe('loop')}: uvloop is not installed") from None
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


def raise_open_file_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit: a server needs a descriptor per peer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


def drop_privileges(
    user: str | None, group: str | None, listeners: Sequence[Listener] = ()
) -> None:
    """Switch to ``group`` and ``user`` after binding (so privileged ports still work).

    Unix socket files made while binding are handed to that user and group first, so
    the group's clients can connect and the server can remove them at exit.
    """
    if user is None and group is None:
        return
    uid = gid = -1
    groups: list[int] | None = None
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError:
            raise SettingsError(f"{describe('group')}: no group {group!r}") from None
        groups = [gid]
    if user is not None:
        try:
            entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        except KeyError:
            raise SettingsError(f"{describe('user')}: no user {user!r}") from None
        uid = entry.pw_uid
        if group is None:
            gid = entry.pw_gid
            groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    for listener in listeners:
        if listener.unix_path:
            os.chown(listener.unix_path, uid, gid)
    if groups is not None:
        os.setgroups(groups)
    if gid != -1:
        os.setgid(gid)
    if uid != -1:
        os.setuid(uid)
    logger.info("running as uid %d gid %d", os.getuid(), os.getgid())


async def _serve_until_signalled(
    server: Server, started: Callable[[Callable[[bool], None]], None] | None = None
) -> None:
    """Start, then stop gracefully on TERM/INT (a second INT stops at once); HUP reloads TLS.

    ``started(stop)`` is called once serving, with the function that stops the server.
    """
    loop = asyncio.get_running_loop()
    await server.start()
    stopping: list[asyncio.Task[None]] = []

    def stop(immediate: bool) -> None:
        if immediate and stopping:
            logger.info("stopping now")
            server.abort()
            return
        if not stopping:
            if started is None:
                notify.notify("STOPPING=1")
            logger.info(
                "stopping: finishing open connections (up to %.1f s)",
                server.settings.graceful_timeout,
            )
            stopping.append(loop.create_task(server.shutdown()))

    interrupts = [0]

    def on_interrupt() -> None:
        interrupts[0] += 1
        stop(interrupts[0] > 1)

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    loop.add_signal_handler(signal.SIGTERM, stop, False)

    def reload() -> None:
        notify.reloading()
        server.reload_tls()
        notify.notify("READY=1")

    loop.add_signal_handler(signal.SIGHUP, reload)
    if started is not None:
        started(stop)
    else:
        notify.notify("READY=1", f"MAINPID={os.getpid()}")
    try:
        await server.wait_closed()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    logger.info("stopped")


def run_server(
    handler: type,
    settings: Settings,
    listeners: list[Listener] | None = None,
    *,
    started: Callable[[Callable[[bool], None]], None] | None = None,
    metrics: tuple[Metrics, Listener] | None = None,
) -> None:
    """Serve in this process until a signal stops it."""
    loop = new_event_loop(settings.loop)
    try:
        server = Server(
            handler,
            settings,
            listeners=listeners,
            metrics=metrics[0] if metrics else None,
            metrics_listener=metrics[1] if metrics else None,
        )
        loop.run_until_complete(_serve_until_signalled(server, started))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


HandlerRef = type | str  # a class, or "module:Class" imported in each worker


class HandlerImportError(ImportError):
    """``module:Class`` could not be imported; the message is one line for the user."""


def load_handler(ref: HandlerRef) -> type:
    """The handler class for a class or a ``module:Class`` path (cwd importable)."""
    if isinstance(ref, type):
        return ref
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerImportError(f"handler {ref!r} must look like MODULE:CLASS")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            message = f"cannot import {module_name!r}: no module named {exc.name!r}"
            raise HandlerImportError(message) from None
        raise
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerImportError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, type):
        raise HandlerImportError(f"{ref!r} is not a class")
    return obj


def serve(handler: HandlerRef, settings: Settings | None = None, **kwargs: Any) -> None:
    """Serve ``handler`` as ``sockserve run`` would, until SIGTERM or SIGINT.

    ``handler`` is a class or a ``"module:Class"`` path; with workers, a path is imported
    afresh by every worker, so a SIGHUP reload picks up new code. Keywords are settings
    (``bind=["127.0.0.1:0"], workers=4, ...``). Bad values raise SettingsError; an address
    that cannot be bound raises OSError.
    """
    settings = settings.replace(**kwargs) if settings else Settings(**kwargs)
    raise_open_file_limit()
    if settings.workers > 1 or settings.reload:
        Supervisor(handler, settings).run()
        return
    handler_class = load_handler(handler)
    handler_kind(handler_class)
    listeners = bind_all(settings)
    try:
        drop_privileges(settings.user, settings.group, listeners)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    run_server(handler_class, settings, listeners)


def check_handler_in_child(ref: str) -> None:
    """Import ``module:Class`` in a throwaway child, so a bad path fails at start while
    this process (the supervisor) never imports user code and reloads stay fresh."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        code = 0
        try:
            handler_kind(load_handler(ref))
        except (HandlerImportError, HandlerKindError) as exc:
            os.write(write_end, str(exc).encode())
            code = 2
        except BaseException:
            os.write(write_end, traceback.format_exc().encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 2:
        raise HandlerImportError(message)
    if code != 0:
        raise RuntimeError(f"importing {ref!r} failed:\n{message}")


BOOT_ERROR = 3  # a worker exits with this when the handler cannot be loaded
CRASH_WINDOW = 5.0  # a worker dying sooner than this after it started counts as a crash
MAX_BACKOFF = 30.0


HEARTBEAT = 1.0  # a worker's loop writes a byte to the supervisor this often (at most)


def heartbeat_interval(settings: Settings) -> float:
    """How often workers beat and the supervisor checks: several times per timeout."""
    return min(HEARTBEAT, settings.worker_timeout / 4)


@dataclass(eq=False)
class _Worker:
    pid: int
    generation: int
    beat_fd: int  # the worker writes a byte here once it serves, then every HEARTBEAT
    started: float
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
        self.workers: dict[int, _Worker] = {}
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
        self._mtimes: dict[str, float] = {}
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
            self.stop_deadline = time.monotonic() + self.settings.graceful_timeout + 5.0
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

    def _live(self) -> list[_Worker]:
        return [w for w in self.workers.values() if not w.stopping]

    def _current(self) -> list[_Worker]:
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
        pid = os.fork()
        if pid == 0:
            os.close(beat_r)
            self._worker_main(listeners, beat_w)
        os.close(beat_w)
        if self.settings.reuse_port:
            for listener in listeners:
                if listener not in self.shared:
                    listener.sock.close()
        worker = _Worker(pid, self.generation, beat_r, time.monotonic())
        self.workers[pid] = worker
        self.selector.register(beat_r, selectors.EVENT_READ, worker)
        logger.info("started worker %d", pid)

    def _worker_main(self, listeners: list[Listener], beat_w: int) -> NoReturn:
        """The child side of fork: never returns."""
        code = 0
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
                signal.signal(sig, signal.SIG_IGN)  # the server's loop handles HUP once up
            os.close(self._alive_w)
            for listener in self.shared:
                listener.shared = True  # the supervisor serves it on after this worker stops
            os.environ.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
            for worker in self.workers.values():
                if worker.beat_fd >= 0:
                    os.close(worker.beat_fd)
            self.selector.close()
            try:
                handler = load_handler(self.handler)
                handler_kind(handler)
            except (HandlerImportError, HandlerKindError) as exc:
                logger.error("worker %d cannot load the handler: %s", os.getpid(), exc)
                os._exit(BOOT_ERROR)
            alive_r = self._alive_r

            def started(stop: Callable[[bool], None]) -> None:
                loop = asyncio.get_running_loop()
                os.write(beat_w, b"1")
                os.set_blocking(beat_w, False)

                interval = heartbeat_interval(self.settings)

                def beat() -> None:
                    with contextlib.suppress(BlockingIOError):
                        os.write(beat_w, b".")
                    loop.call_later(interval, beat)

                if interval:
                    loop.call_later(interval, beat)

                def supervisor_gone() -> None:
                    loop.remove_reader(alive_r)
                    logger.error("supervisor is gone; stopping")
                    stop(False)

                loop.add_reader(alive_r, supervisor_gone)

            run_server(
                handler,
                self.settings,
                listeners,
                started=started,
                metrics=self.metrics,
            )
        except BaseException:
            logger.exception("worker %d failed", os.getpid())
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def _beat_event(self, worker: _Worker) -> None:
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

    def _stop_worker(self, worker: _Worker, signum: int) -> None:
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
            code = os.waitstatus_to_exitcode(status)
            if self.metrics is not None:
                self.metrics[0].worker_exited(pid)
            self._worker_exited(worker, code)

    def _worker_exited(self, worker: _Worker, code: int) -> None:
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
        self.reload_deadline = time.monotonic() + 60.0
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
            self.stop_deadline = now + 5.0
        if self.reload_generation is not None and now >= self.reload_deadline:
            logger.error("reload timed out; keeping the old workers")
            self._abort_reload()
            notify.notify("READY=1")
        if self.settings.reload and not self.stopping and now >= self._next_scan:
            self._next_scan = now + 1.0
            if self._sources_changed():
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

    def _sources_changed(self) -> bool:
        """Development reload: did any .py file under the current directory change?"""
        mtimes: dict[str, float] = {}
        for root, dirs, files in os.walk(os.getcwd()):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    with contextlib.suppress(OSError):
                        mtimes[path] = os.stat(path).st_mtime
        changed = bool(self._mtimes) and mtimes != self._mtimes
        self._mtimes = mtimes
        return changed


_SKIP_DIRS = frozenset({"__pycache__", "node_modules", "venv", "build", "dist"})


class SupervisorError(SystemExit):
    """The supervisor stopped because workers could not run; ``code`` is the exit status."""

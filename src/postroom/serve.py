"""``postroom serve``: build the App and run every configured listener, in one or several worker processes.

Invariants:
- Everything that can fail on bad input (config, certificate, binding the ports, opening the store) fails in
  the first process, before any worker is forked, as one :class:`PostroomError` line.
- Handlers come from the explicit :data:`HANDLERS` table, imported lazily; a service whose adapter module
  is missing is skipped with a warning, never a crash.
- ``workers = N > 1``: the parent binds each address once (without SO_REUSEPORT, so a port held by any
  other program fails loudly) and forks N workers that all accept from that one socket: one accept queue,
  and a connection goes to whichever worker takes it first, i.e. one that is free. SO_REUSEPORT (a queue
  per worker, connections hashed among them) left new connections waiting behind a busy worker while the
  other one slept (SMTP, 20 sessions, two workers: 11 of 13 interleaved pairs faster, +7 % at the medians;
  level at 50; ``docs/benchmarks.md``), and lost the queued connections of a worker that died. The
  parent keeps the sockets for the workers it restarts (connections wait in the queue meanwhile) and
  closes them when it stops; otherwise it only supervises: it forwards SIGTERM/SIGINT/SIGHUP and restarts a
  worker that died. A worker gets SIGTERM from the kernel when the parent dies (:func:`_die_with_parent`).
- Each worker opens its own store connection (never shared across fork) on the one data directory.
- SIGTERM: stop accepting, drain sessions for ``[net] shutdown_grace`` seconds, cancel the rest, exit 0.
  SIGHUP: reload the TLS certificate (the old one stays if the new one does not load) and the store domains.
- Local domains are ``domains`` from the config plus the store's domains; the App's config is replaced with
  the union at start, on SIGHUP and every :data:`DOMAIN_REFRESH` seconds, so ``app.config.is_local_domain``
  answers for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import importlib
import importlib.machinery
import logging
import os
import signal
import socket
import ssl
import sys
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, cast

from postroom import __version__
from postroom import log as logmod
from postroom.app import App, Handler, ListenerSpec, TlsMode
from postroom.auth.service import Authenticator
from postroom.config import STANDARD_PORTS, Config, parse_hostport
from postroom.errors import ConfigError, PostroomError
from postroom.net import eventloop, tls
from postroom.net.server import Listener, bind_socket, shutdown
from postroom.store import sqlite_native
from postroom.store.api import Store

log = logging.getLogger(__name__)

#: service → "module:attribute" of its handler. Imported lazily; a missing module skips the service.
HANDLERS: dict[str, str] = {
    "smtp": "postroom.smtp.adapter:SmtpSession",
    "submission": "postroom.smtp.adapter:SmtpSession",
    "submissions": "postroom.smtp.adapter:SmtpSession",
    "pop3": "postroom.pop3.adapter:handle",
    "pop3s": "postroom.pop3.adapter:handle",
    "imap": "postroom.imap.adapter:handle",
    "imaps": "postroom.imap.adapter:handle",
}
#: Services whose listeners speak TLS from the first byte; all others offer STARTTLS/STLS.
IMPLICIT_TLS = frozenset({"submissions", "pop3s", "imaps"})
#: The outbound queue runner: ``QueueRunner(app)`` with ``await start()`` / ``await stop()``.
QUEUE_RUNNER = "postroom.delivery.runner:QueueRunner"
#: Store backends by URL scheme: "module:function" returning an unopened Store, called as
#: ``function(url, writer_scheduling=…)`` (``[store] writer_scheduling``).
STORE_BACKENDS: dict[str, str] = {
    "sqlite": "postroom.store.sqlite:open_store",
    "postgresql": "postroom.store.postgres:open_store",
    "postgres": "postroom.store.postgres:open_store",
}

DOMAIN_REFRESH = 10.0  # seconds between re-reading the store's domains in each worker (one small query)
RESTART_DELAY_MAX = 30.0  # seconds; a worker that keeps crashing is restarted with a doubling delay
MIN_UPTIME = 5.0  # seconds; a worker that died sooner counts as a crash loop
MAX_QUICK_CRASHES = 10  # consecutive quick crashes of one worker before the server gives up
KILL_MARGIN = 5.0  # seconds after shutdown_grace before the parent kills a worker that did not exit
KILL_REPEAT = 1.0  # seconds between SIGKILLs to workers the kernel has not finished yet (e.g. in D state)


def _warn(text: str) -> None:
    print(f"postroom: warning: {text}", file=sys.stderr, flush=True)


class _Unavailable(Exception):
    """The module behind a "module:attribute" reference does not exist (yet)."""


def load_object(ref: str) -> Any:
    """Import ``"module:attribute"``. _Unavailable when the module is missing; other import errors
    propagate (a broken module is a bug to show, not to hide)."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise _Unavailable(f"{module_name} is not available") from None
        raise
    try:
        return getattr(module, attr)
    except AttributeError:
        raise _Unavailable(f"{module_name} has no {attr}") from None


def listener_specs(cfg: Config) -> list[ListenerSpec]:
    """Every configured listening address with its TLS mode, in the table's order."""
    specs = []
    for service in STANDARD_PORTS:
        mode: TlsMode = "implicit" if service in IMPLICIT_TLS else "starttls"
        for addr in getattr(cfg.listeners, service):
            host, port = parse_hostport(addr)
            specs.append(ListenerSpec(service, host, port, mode))
    return specs


def load_handlers(specs: list[ListenerSpec]) -> tuple[dict[str, Handler], list[str]]:
    """The handler of each configured service, and one note per service that is skipped."""
    handlers: dict[str, Handler] = {}
    notes: list[str] = []
    for service in dict.fromkeys(s.service for s in specs):
        ref = HANDLERS.get(service)
        if ref is None:
            notes.append(f"{service}: no server for this service yet; its listeners are skipped")
            continue
        try:
            handlers[service] = cast(Handler, load_object(ref))
        except _Unavailable as exc:
            notes.append(f"{service}: {exc}; its listeners are skipped")
        except Exception as exc:
            notes.append(f"{service}: {ref} failed to load ({type(exc).__name__}: {exc}); skipped")
    return handlers, notes


async def open_configured_store(cfg: Config) -> Store:
    """Open the store ``cfg`` names (``[store] url``, default ``data_dir/store``)."""
    scheme = cfg.store_url.partition("://")[0]
    ref = STORE_BACKENDS.get(scheme)
    if ref is None:
        raise ConfigError(f"{cfg.source}: store.url: unknown scheme {scheme!r}")
    try:
        opener = load_object(ref)
    except _Unavailable:
        raise ConfigError(f"{cfg.source}: store.url: the {scheme} backend is not available") from None
    store = cast(Store, opener(cfg.store_url, writer_scheduling=cfg.store.writer_scheduling))
    await store.open()
    return store


def redact(url: str) -> str:
    """``url`` without its password, for banners and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


async def refresh_domains(app: App, base: Config) -> None:
    """Make ``app.config.domains`` the config's domains plus the store's (see module invariants)."""
    stored = [d.lower().rstrip(".") for d in await app.store.list_domains()]
    merged = tuple(dict.fromkeys([*base.domains, *stored]))
    if merged != app.config.domains:
        app.config = dataclasses.replace(base, domains=merged)


# -- one worker --------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Plan:
    """What the first process decided, handed to every worker."""

    cfg: Config
    specs: list[ListenerSpec]  # with the real ports (port 0 resolved)
    handlers: dict[str, Handler]
    certs: tls.CertFiles
    tls_ctx: ssl.SSLContext
    workers: int


def _reload_tls(app: App, certs: tls.CertFiles) -> None:
    try:
        ctx = tls.server_context(certs)
        fp = tls.fingerprint(certs.cert)
    except PostroomError as exc:
        log.error("TLS reload failed, keeping the current certificate: %s", exc)
        return
    app.tls = ctx
    log.info("TLS certificate reloaded from %s (SHA256 %s)", certs.cert, fp)


async def run_worker(plan: _Plan, index: int, sockets: list[socket.socket]) -> int:
    """Serve until SIGTERM/SIGINT on ``sockets``: bound ones, one per spec, shared by every worker."""
    cfg = plan.cfg
    loop = asyncio.get_running_loop()
    store = await open_configured_store(cfg)
    app = App(cfg, store, Authenticator(store, cfg.auth), plan.tls_ctx)
    listeners: list[Listener] = []
    runner: Any = None
    tasks: set[asyncio.Task[None]] = set()
    stop = asyncio.Event()
    try:
        await refresh_domains(app, cfg)
        for i, spec in enumerate(plan.specs):
            listener = Listener(spec, app, plan.handlers[spec.service])
            await listener.start(sock=sockets[i])
            listeners.append(listener)
        if index == 0:
            runner = await _start_runner(app)

        def on_hup() -> None:
            _reload_tls(app, plan.certs)
            task = loop.create_task(_refresh_once(app, cfg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        refresher = loop.create_task(_refresh_forever(app, cfg))
        tasks.add(refresher)
        who = f"worker {index + 1}/{plan.workers}" if plan.workers > 1 else "server"
        print(f"{who} ready (pid {os.getpid()})", flush=True)
        await stop.wait()
        grace = cfg.net.shutdown_grace
        running = sum(len(lst.sessions) for lst in listeners)
        log.info("shutting down: %d sessions get %.1f s to finish", running, grace)
        stopping = [shutdown(listeners, grace)]
        if runner is not None:
            stopping.append(asyncio.wait_for(runner.stop(), grace + KILL_MARGIN))
        results = await asyncio.gather(*stopping, return_exceptions=True)
        if isinstance(results[0], int) and results[0]:
            log.info("cancelled %d sessions still running after %.1f s", results[0], grace)
        for res in results[1:]:
            if isinstance(res, BaseException):
                log.error("queue runner did not stop cleanly: %s", res)
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in tasks:
            task.cancel()
        if listeners and not stop.is_set():
            await shutdown(listeners, 0.0)
        await store.close()


async def _refresh_once(app: App, base: Config) -> None:
    try:
        await refresh_domains(app, base)
    except PostroomError as exc:
        log.warning("could not refresh the store's domains: %s", exc)


async def _refresh_forever(app: App, base: Config) -> None:
    while True:
        await asyncio.sleep(DOMAIN_REFRESH)
        await _refresh_once(app, base)


async def _start_runner(app: App) -> Any:
    try:
        runner_cls = load_object(QUEUE_RUNNER)
    except _Unavailable as exc:
        log.info("outbound queue runner not started: %s", exc)
        return None
    runner = runner_cls(app)
    try:
        await runner.start()
    except Exception:  # our bug, not the operator's: serve inbound mail anyway; the queue waits on disk
        log.exception("outbound queue runner failed to start; queued mail waits for a restart")
        return None
    app.extras["queue"] = runner
    log.info("outbound queue runner started")
    return runner


# -- the first process ------------------------------------------------------------------------------
def _bind_all(specs: list[ListenerSpec]) -> tuple[list[ListenerSpec], list[socket.socket]]:
    """Bind every address (see module invariants). Returns the specs with real ports and the sockets."""
    resolved: list[ListenerSpec] = []
    socks: list[socket.socket] = []
    try:
        for spec in specs:
            sock = bind_socket(spec.service, spec.host, spec.port)
            socks.append(sock)
            resolved.append(dataclasses.replace(spec, port=int(sock.getsockname()[1])))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return resolved, socks


def code_kind() -> str:
    """How this process runs Postroom: how many of its loaded modules are compiled extensions (``make
    native``), or plain Python. Called after the handlers are loaded, so the hot modules are counted."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    compiled = [
        name
        for name, module in list(sys.modules.items())
        if name.startswith("postroom.")
        and name != "postroom.store._sqlite_fast"  # written in C: reported as the commit path below
        and str(getattr(module, "__file__", "") or "").endswith(suffixes)
    ]
    why_not = sqlite_native.unavailable()
    commit = "appends commit without the GIL" if why_not is None else f"appends commit in Python ({why_not})"
    if not compiled:
        return f"plain Python (make native compiles the hottest modules); {commit}"
    return f"{len(compiled)} modules compiled with mypyc, the rest plain Python; {commit}"


def banner(plan: _Plan, notes: list[str]) -> str:
    cfg = plan.cfg
    how = "self-signed, generated by Postroom" if plan.certs.self_signed else "configured"
    lines = [
        f"Postroom {__version__} serving {cfg.hostname} with {plan.workers} worker(s), pid {os.getpid()}",
        f"  data      {cfg.data_path.resolve()}",
        f"  store     {redact(cfg.store_url)} (writer scheduling: {cfg.store.writer_scheduling})",
        f"  domains   {', '.join(cfg.domains) or '(none in the config; see postroom domain list)'}",
        f"  tls cert  {plan.certs.cert.resolve()} ({how})",
        f"  sha256    {tls.fingerprint(plan.certs.cert)}",
        f"  code      {code_kind()}",
    ]
    for spec in plan.specs:
        where = f"[{spec.host}]:{spec.port}" if ":" in spec.host else f"{spec.host}:{spec.port}"
        mode = "implicit TLS" if spec.tls == "implicit" else "STARTTLS"
        lines.append(f"  listen    {spec.service:<12} {where:<22} {mode}")
    lines.extend(f"  skipped   {note}" for note in notes)
    return "\n".join(lines)


def serve(cfg: Config) -> int:
    """Run the server described by ``cfg`` until SIGTERM. Returns the exit status."""
    try:
        logmod.setup(cfg.log_level)
    except ValueError as exc:
        raise ConfigError(f"{cfg.source}: log_level: {exc}") from None
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload before the workers are up changes nothing
    try:
        cfg.data_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{cfg.source}: data_dir {cfg.data_dir}: {exc.strerror}") from None
    tls_ctx, certs = tls.load(cfg)
    specs = listener_specs(cfg)
    handlers, notes = load_handlers(specs)
    for note in notes:
        _warn(note)
    specs = [s for s in specs if s.service in handlers]
    if not specs:
        raise ConfigError(f"{cfg.source}: no listener to start (every service is off or unavailable)")
    workers = cfg.worker_count
    specs, socks = _bind_all(specs)
    plan = _Plan(cfg, specs, handlers, certs, tls_ctx, workers)
    try:
        if workers == 1:
            print(banner(plan, notes), flush=True)
            return eventloop.run(run_worker(plan, 0, socks), cfg.net.event_loop)
        asyncio.run(_check_store(cfg))  # schema created once, errors shown once, before forking
        print(banner(plan, notes), flush=True)
        return _Supervisor(plan, socks).run()
    finally:
        for s in socks:
            s.close()


async def _check_store(cfg: Config) -> None:
    store = await open_configured_store(cfg)
    await store.close()


PR_SET_PDEATHSIG = 1  # prctl(2), Linux: the signal a process gets when the thread that forked it dies


def _die_with_parent(parent: int) -> bool:
    """In a worker just forked: have the kernel send it SIGTERM (a graceful stop) when the supervisor dies,
    even by SIGKILL, so no worker outlives it, still accepting from the shared sockets and holding the ports
    a restarted server needs. False when the supervisor died before the call. Where ``prctl`` is missing
    (not Linux) the worker only loses this guard."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return True
    return os.getppid() == parent


class _Supervisor:
    """The parent of ``workers`` forked processes (see module invariants)."""

    SIGNALS = frozenset({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

    def __init__(self, plan: _Plan, sockets: list[socket.socket]) -> None:
        self.plan = plan
        self.sockets = sockets  # the listening sockets every worker accepts from; closed when stopping
        self.children: dict[int, tuple[int, float]] = {}  # pid → (worker index, start time)
        self.quick_crashes: dict[int, int] = {}
        self.restarts: list[tuple[float, int]] = []  # (when, index)
        self.stopping = False
        self.kill_at = 0.0  # when stopping: the monotonic time at which the workers left get SIGKILL
        self.failed = False

    def run(self) -> int:
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        try:
            for index in range(self.plan.workers):
                self._spawn(index, old_mask)
            while self.children or (self.restarts and not self.stopping):
                now = time.monotonic()
                wake = [self.kill_at] if self.stopping else [when for when, _ in self.restarts]
                timeout = max(0.0, min([*wake, now + 1.0]) - now)
                info = signal.sigtimedwait(self.SIGNALS, timeout)
                if info is None:
                    if self.stopping and time.monotonic() >= self.kill_at:
                        log.warning("%d workers still running after the grace period: SIGKILL", len(self.children))
                        self._signal_all(signal.SIGKILL)
                        self.kill_at = time.monotonic() + KILL_REPEAT  # until reaped; never a busy loop
                elif info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    self._stop()
                elif info.si_signo == signal.SIGHUP:
                    log.info("reload: forwarding SIGHUP to %d workers", len(self.children))
                    self._signal_all(signal.SIGHUP)
                else:
                    self._reap()
                if not self.stopping:
                    self._restart_due(old_mask)
            return 1 if self.failed else 0
        finally:
            self._stop_listening()
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _stop(self) -> None:
        """SIGTERM every worker and stop listening; the first time, start the grace period
        (``shutdown_grace`` + ``KILL_MARGIN``) after which the workers left are killed."""
        if not self.stopping:
            self.stopping = True
            self.restarts.clear()
            self.kill_at = time.monotonic() + self.plan.cfg.net.shutdown_grace + KILL_MARGIN
            log.info("stopping %d workers", len(self.children))
        self._signal_all(signal.SIGTERM)
        self._stop_listening()

    def _stop_listening(self) -> None:
        """Close the parent's copy of the listening sockets: once the workers have closed theirs (the first
        thing they do on SIGTERM), new connections are refused instead of waiting in a queue no one reads."""
        for sock in self.sockets:
            sock.close()

    def _spawn(self, index: int, old_mask: set[int | signal.Signals]) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's loop handles it
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                if not _die_with_parent(parent):
                    code = 0  # the supervisor is gone already: serve nothing
                    return
                code = eventloop.run(run_worker(self.plan, index, self.sockets), self.plan.cfg.net.event_loop)
            except PostroomError as exc:
                print(f"postroom: error: worker {index + 1}: {exc}", file=sys.stderr, flush=True)
            except KeyboardInterrupt:
                code = 0
            except BaseException:
                log.exception("worker %d failed", index + 1)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        self.children[pid] = (index, time.monotonic())

    def _signal_all(self, sig: signal.Signals) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            entry = self.children.pop(pid, None)
            if entry is None:
                continue
            index, started = entry
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                continue
            uptime = time.monotonic() - started
            quick = self.quick_crashes.get(index, 0) + 1 if uptime < MIN_UPTIME else 0
            self.quick_crashes[index] = quick
            if quick >= MAX_QUICK_CRASHES:
                log.error("worker %d keeps dying (exit %s); stopping the server", index + 1, code)
                self.failed = True
                self._stop()  # the other workers get the same grace as on SIGTERM
                return
            delay = min(RESTART_DELAY_MAX, 0.1 * 2**quick) if quick else 0.0
            log.error("worker %d (pid %d) exited with %s; restarting in %.1f s", index + 1, pid, code, delay)
            self.restarts.append((time.monotonic() + delay, index))

    def _restart_due(self, old_mask: set[int | signal.Signals]) -> None:
        now = time.monotonic()
        due = [index for when, index in self.restarts if when <= now]
        self.restarts = [(when, index) for when, index in self.restarts if when > now]
        for index in due:
            self._spawn(index, old_mask)

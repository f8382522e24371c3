"""A running server: the model, its adapters, the decode thread, and uvicorn serving the app on a socket.

:class:`Server` binds its socket first (so ``port=0`` picks a free port and ``url`` is known at once), answers
``/health`` with 503 while ``loader()`` loads the model, then serves. ``start()`` runs uvicorn on a thread of
its own (the API and the tests); ``run()`` on the calling thread, where uvicorn turns SIGTERM / SIGINT into a
graceful shutdown: no new connections, in-flight requests finish (at most ``grace`` seconds), exit 0.
"""
from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraq.errors import LoraqError
from loraq.serving.adapters import AdapterRegistry, ServedBase
from loraq.serving.metrics import Metrics
from loraq.serving.protocol import ApiError, Context, Job, parse_chat, parse_completion

log = logging.getLogger("loraq.serve")


@dataclass(frozen=True)
class Limits:
    """``max_batch`` rows decode together; ``max_queue`` requests wait; ``max_active_adapters`` installed."""

    max_batch: int = 16
    max_queue: int = 64
    max_active_adapters: int = 16


class Served:
    """The model being served, its adapters and decode thread; what the routes call."""

    def __init__(self, loaded, base: ServedBase, metrics: Metrics, limits: Limits):
        from loraq.serving.scheduler import Scheduler

        self.model, self.tokenizer, self.base, self.limits = loaded.model, loaded.tokenizer, base, limits
        config = self.model.config
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self.registry = AdapterRegistry(self.model, base, limits.max_active_adapters,
                                        on_event=lambda event, name: metrics.adapter_event(event, name))
        self.scheduler = Scheduler(self.model, self.tokenizer, self.registry, metrics, max_batch=limits.max_batch,
                                   max_queue=limits.max_queue, context_length=self.context_length)
        self.created = int(time.time())

    def parse(self, body: dict, kind: str) -> Job:
        context = Context(self.tokenizer, self.context_length, self.base.name, self.limits.max_batch,
                          lambda name: name in self.registry.registered)
        job = (parse_chat if kind == "chat" else parse_completion)(body, context)
        if job.choices > self.limits.max_batch:
            raise ApiError(400, f"n times the number of prompts is {job.choices}: at most {self.limits.max_batch} "
                           "(the server's --max-batch)", param="n")
        return job

    def prefetch(self, job: Job) -> None:
        """Read the files of the job's adapters that are not installed (on the caller's thread)."""
        for name, _ in job.route:
            try:
                self.registry.prefetch(name)
            except LoraqError:  # its folder went away: the install says so to this request
                pass

    def shaper(self, job: Job):
        from loraq.serving.responses import Shaper

        decode = self.scheduler.decode
        return Shaper(job, decode, lambda token: decode([token]))

    def model_cards(self) -> list[dict]:
        card = {"object": "model", "created": self.created, "owned_by": "loraq"}
        cards = [dict(card, id=self.base.name, root=self.base.name, parent=None)]
        for entry in list(self.registry.registered.values()):
            cards.append(dict(card, id=entry.name, root=str(entry.path), parent=self.base.name))
        return cards

    def load_adapter(self, name: str, path: str) -> None:
        """Register (or replace) ``name``: a 400 naming the reason when the folder does not fit the base."""
        if name == self.base.name:
            raise ApiError(400, f"{name!r} is the base's name; give the adapter another", param="lora_name")
        try:
            self.registry.register(name, path)
        except LoraqError as exc:
            raise ApiError(400, str(exc), param="lora_path") from None

    def unload_adapter(self, name) -> None:
        try:
            self.registry.unregister(name)
        except (KeyError, TypeError):
            raise ApiError(404, f"no adapter named {name!r} is loaded", param="lora_name",
                           code="model_not_found") from None


class Server:
    """``loraq serve`` (see the module docstring). ``loader() -> (LoadedModel, ServedBase)``; ``adapters``: name ->
    folder, registered once the model is loaded."""

    def __init__(self, loader: Callable, adapters: dict[str, str] | None = None, *, host: str = "127.0.0.1",
                 port: int = 8000, api_key: str | None = None, admin_key: str | None = None,
                 limits: Limits = Limits(), grace: float = 30.0, say: Callable[[str], None] | None = None):
        self.loader, self.adapters, self.limits, self.grace = loader, dict(adapters or {}), limits, grace
        self.say = say or (lambda message: None)
        self.api_key, self.admin_key = api_key, admin_key
        self.metrics = Metrics()
        self.served: Served | None = None
        self.failed: BaseException | None = None
        self.socket = _bind(host, port)
        self.host, self.port = self.socket.getsockname()[:2]
        self._uvicorn = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def load(self) -> None:
        """Load the model and register the adapters (``/health`` turns 200)."""
        try:
            loaded, base = self.loader()
            served = Served(loaded, base, self.metrics, self.limits)
            for name, path in self.adapters.items():
                served.registry.register(name, path)
            served.scheduler.start()
            self.served = served
            names = ", ".join(self.adapters) or "none yet"
            self.say(f"serving {served.base.name} (adapters: {names}) at {self.url}/v1; playground: {self.url}/")
        except BaseException as exc:
            self.failed = exc
            raise

    def _uvicorn_server(self):
        import uvicorn

        from loraq.serving.app import build_app

        config = uvicorn.Config(build_app(self), log_level="warning", timeout_graceful_shutdown=self.grace,
                                lifespan="off")
        self._uvicorn = uvicorn.Server(config)
        return self._uvicorn

    def start(self, wait: bool = True) -> Server:
        """Serve on a thread; with ``wait``, return once the model is loaded (its error raised here)."""
        server = self._uvicorn_server()
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self.socket]}, name="loraq-http",
                                        daemon=True)
        self._thread.start()
        if wait:
            try:
                self.load()
            except BaseException:
                self.stop()
                raise
        else:
            threading.Thread(target=self._load_quietly, name="loraq-load", daemon=True).start()
        return self

    def run(self) -> None:
        """Serve on this thread until SIGTERM / SIGINT; the model loads meanwhile."""
        self.say(f"listening on {self.url} (GET /health is 503 until the model is loaded)")
        server = self._uvicorn_server()
        threading.Thread(target=self._load_quietly, name="loraq-load", daemon=True).start()
        # uvicorn shuts down gracefully on SIGTERM / SIGINT, then raises the signal again with the handlers it
        # found: these make that a normal return (exit 0), not a death by signal
        before = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.run(sockets=[self.socket])
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)
            self._stop_decoding()
        self.say("stopped")
        if self.failed is not None:
            raise self.failed

    def _load_quietly(self) -> None:
        try:
            self.load()
        except BaseException:  # run() raises it once uvicorn stops
            if self._uvicorn is not None:
                self._uvicorn.should_exit = True

    def stop(self) -> None:
        """Finish in-flight requests (at most ``grace`` seconds) and stop."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(self.grace + 5)
        self._stop_decoding()

    def _stop_decoding(self) -> None:
        if self.served is not None:
            self.served.scheduler.stop(self.grace)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one); a LoraqError naming a port in use."""
    from loraq.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def adapters_in(folder: str | Path) -> dict[str, str]:
    """Every adapter folder directly inside ``folder`` (holding adapter_config.json), by folder name."""
    from loraq.errors import ConfigError

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--adapters-dir {folder}: not a folder")
    return {p.name: str(p) for p in sorted(root.iterdir()) if (p / "adapter_config.json").is_file()}

"""Run the server: :func:`serve` opens the store, loads the model, and runs uvicorn until a signal.

Graceful shutdown (SIGTERM or SIGINT): uvicorn stops accepting connections, lets every request
in flight finish (up to ``graceful_timeout_s``), then the application's shutdown waits for the
store calls still running and the store is closed. A write is acknowledged only once the store
committed it (SQLite ``synchronous=FULL``, PostgreSQL's commit), so no acknowledged write is
lost, even to a SIGKILL. A signal that arrives while the model loads stops the start cleanly.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import signal
from dataclasses import dataclass
from types import FrameType

from memfusion.errors import InvalidInput
from memfusion.serve.app import ServeConfig, create_app, load_engine
from memfusion.store import open_store

log = logging.getLogger("memfusion.serve")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class RunConfig:
    """Where to listen. ``port`` 0: any free port (the log line ``Uvicorn running on ...`` names it)."""

    host: str = "127.0.0.1"
    port: int = 8700
    graceful_timeout_s: float = 30.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise InvalidInput(f"host must be an address or host name such as 127.0.0.1, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise InvalidInput(f"port must be an integer in [0, 65535], got {self.port!r}")
        g = self.graceful_timeout_s
        if isinstance(g, bool) or not isinstance(g, int | float) or not math.isfinite(g) or g <= 0:
            raise InvalidInput(f"graceful_timeout_s must be a positive number of seconds, got {g!r}")
        if self.log_level not in LOG_LEVELS:
            raise InvalidInput(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


class Terminated(Exception):
    """SIGTERM arrived (raised by the handler :func:`serve` installs; uvicorn re-raises it after draining)."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def serve(config: ServeConfig, run: RunConfig | None = None) -> None:
    """Serve until SIGTERM / SIGINT, then shut down gracefully (see the module docstring)."""
    import uvicorn

    run = run or RunConfig()
    logging.basicConfig(level=run.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not run.loopback:
        log.warning("listening on %s: the API has no TLS; put a TLS-terminating proxy in front of it", run.host)
    previous = signal.signal(signal.SIGTERM, _terminate)
    store = None
    try:
        store = open_store(config.store_url, **config.store_options)
        if config.model != "none":
            log.info("loading the model %r", config.model)
        app = create_app(config, store=store, engine=load_engine(config, store))
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=run.host,
                port=run.port,
                log_level=run.log_level,
                timeout_graceful_shutdown=math.ceil(run.graceful_timeout_s),
                limit_concurrency=config.limits.max_connections,
                access_log=run.log_level == "debug",
            )
        )
        server.run()
    except (Terminated, KeyboardInterrupt):
        log.info("stopped by a signal")
    finally:
        if store is not None:
            store.close()
        signal.signal(signal.SIGTERM, previous)

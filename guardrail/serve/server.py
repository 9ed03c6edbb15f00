"""Running the app: uvicorn in the foreground (the CLI) or in a background thread (tests, embedding),
and policy reload on SIGHUP."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from typing import Any, Callable

import uvicorn
from starlette.applications import Starlette

from guardrail.serve.app import ServerState

log = logging.getLogger("guardrail.serve")


def install_sighup(state: ServerState, done: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Reload the policies on SIGHUP (main thread only). The reload runs in its own thread, not in
    the signal handler, so a slow policy build never stalls the event loop. Returns the previous
    handler, for `signal.signal(signal.SIGHUP, previous)`."""

    def reload() -> None:
        try:
            record = state.reload()
        except Exception:  # a failing audit sink, say: log it, keep serving
            log.exception("policy reload on SIGHUP failed")
            return
        if record.get("ok"):
            log.warning("policies reloaded on SIGHUP: %s", record.get("new_hash"))
        else:
            log.error("policy reload on SIGHUP rejected, keeping %s: %s", record.get("kept_hash"), record.get("problems"))
        if done is not None:
            done(record)

    def handler(signum: int, frame: Any) -> None:
        threading.Thread(target=reload, name="guardrail-sighup-reload", daemon=True).start()

    return signal.signal(signal.SIGHUP, handler)


class _Terminated(Exception):
    pass


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def run(app: Starlette, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGINT or SIGTERM; SIGHUP reloads the policies.

    uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler that was in
    place before it; with the default handler that would kill the process before the caller could
    close the guard (and its audit sinks). Ours turns it into a normal return instead."""
    previous_hup = install_sighup(app.state.guardrail)
    previous_term = signal.signal(signal.SIGTERM, _terminated)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")).run()
    except _Terminated:
        pass
    finally:
        signal.signal(signal.SIGHUP, previous_hup)
        signal.signal(signal.SIGTERM, previous_term)


class ServerThread:
    """The app on a loopback port in a background thread: `with ServerThread(app) as srv: srv.url`.

    The socket is bound before the thread starts (port 0 picks a free port), so there is no race
    between choosing a port and listening on it."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        stopped = threading.Event()
        for _ in range(int(timeout / 0.02)):
            if self.server.started or not self.thread.is_alive():
                break
            stopped.wait(0.02)
        if not self.server.started:
            raise RuntimeError(f"the server did not start on {self.url} within {timeout} s")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

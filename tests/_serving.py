"""An in-process ``tfgraph serve`` app on 127.0.0.1 for tests: started in a thread, stopped after."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


@contextlib.contextmanager
def running(config) -> Iterator[str]:
    """Serve a ``uvicorn.Config`` (port 0: a free one) in a thread; yields its URL, then shuts it down."""
    import uvicorn

    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    host, port = srv.servers[0].sockets[0].getsockname()[:2]
    assert host == "127.0.0.1"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()


def config(app, **options):
    import uvicorn

    return uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", **options)

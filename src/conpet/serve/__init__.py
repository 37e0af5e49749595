"""``conpet serve``: a run's bank of modules behind OpenAI-compatible HTTP endpoints.

    from conpet.serve import ServeSettings, serve
    serve("runs/dynamic", ServeSettings(port=8000))      # blocks; SIGTERM finishes in-flight requests

Needs the ``conpet[serve]`` extra (FastAPI, uvicorn, prometheus-client).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from conpet.errors import ConpetError
from conpet.model import ContinualModel
from conpet.serve.settings import ServeSettings


def _require_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ConpetError(f"conpet serve needs the serve extra ({error.name} is missing): "
                          f"pip install 'conpet[serve]'") from None


def serve(run_dir: str | Path, settings: ServeSettings = ServeSettings()) -> None:
    """Load the run (:class:`ContinualModel`) and answer requests until SIGINT/SIGTERM, which stop
    taking new connections and finish the requests in flight. Says ``conpet serve: listening on
    URL`` on stderr once requests can come (with ``port=0``, the port it got)."""
    settings.check()
    _require_extra()
    import uvicorn

    from conpet.serve.app import create_app

    logging.basicConfig(level=logging.WARNING, format="conpet serve: %(levelname)s %(message)s", stream=sys.stderr)
    model = ContinualModel.from_run(run_dir, seed=settings.seed, device=settings.device)
    try:
        app = create_app(model, settings)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                timeout_graceful_shutdown=max(1, int(settings.timeout_s)), access_log=False)
        server = uvicorn.Server(config)

        async def main() -> None:
            running = asyncio.create_task(server.serve())
            while not server.started and not running.done():
                await asyncio.sleep(0.05)
            if server.started:
                host, port = server.servers[0].sockets[0].getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"conpet serve: listening on http://{shown}:{port} ({len(model.tasks)} task(s): "
                      f"{', '.join(model.tasks)})", file=sys.stderr, flush=True)
            await running

        # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again with the handler
        # it found: a handler that only records it lets a graceful stop end with exit status 0
        stopped: list[int] = []
        previous = {sig: signal.signal(sig, lambda number, frame: stopped.append(number))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            asyncio.run(main())
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        model.close()


__all__ = ["ServeSettings", "serve", "ContinualModel"]

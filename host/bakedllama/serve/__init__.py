"""`bakedllama serve`: an OpenAI-compatible completions server for one device, many clients.

    bakedllama serve --device golden            # or sim (default), socket://127.0.0.1:PORT, /dev/ttyUSB0
    python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-');
               print(c.completions.create(model='bakedllama-tiny', prompt='It was').choices[0].text)"

Routes: POST /v1/completions (OpenAI's, with `stream` as server-sent events), GET /v1/models,
GET /health, GET /metrics (Prometheus text), GET / (the playground page). Starlette + uvicorn:
see README.md ("Serving") for why, and bakedllama.serve.scheduler for queueing and aborts."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 16


def model_name(model_path) -> str:
    """`bakedllama-tiny` for weights/tiny/model-q.bkl; else bakedllama-<file stem>."""
    from bakedllama.model import DEFAULT_BAKED

    p = Path(model_path or DEFAULT_BAKED)
    return f"bakedllama-{p.parent.name if p.name == Path(DEFAULT_BAKED).name else p.stem}"


def make_backend(device: str, model, log=None):
    from bakedllama.serve.backends import DeviceBackend, GoldenBackend

    if device == "golden":
        return GoldenBackend(model)
    return DeviceBackend(None if device == "sim" else device, model, log=log)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port); OSError says why not."""
    fam, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    s = socket.socket(fam, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(addr)
        s.listen(128)
    except OSError:
        s.close()
        raise
    return s


def run(model, tok, *, model_path=None, device: str = "sim", host: str = "127.0.0.1",
        port: int = DEFAULT_PORT, max_queue: int = DEFAULT_MAX_QUEUE, log=None) -> int:
    """Connect the device, listen, serve until Ctrl-C. Raises DeviceError / OSError (one line)."""
    import uvicorn

    from bakedllama.serve.api import Server, build_app

    log = log or (lambda m: print(f"bakedllama serve: {m}", file=sys.stderr, flush=True))
    backend = make_backend(device, model, log=log)
    try:
        info = backend.connect()  # a wrong URL or another model's board: one line, before listening
        sock = listen(host, port)
    except BaseException:
        getattr(backend, "stop", backend.close)()
        raise
    h, p = sock.getsockname()[:2]
    url = f"http://{'[' + h + ']' if ':' in h else h}:{p}"
    server = Server(model, tok, backend, model_id=model_name(model_path), max_queue=max_queue, log=log)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"listening on {host}: reachable from other machines, with no authentication")

    def ready():
        print(f"bakedllama serve: {url} (model {server.model_id} on {info.get('device')}, "
              f"{info.get('board')}; queue {max_queue}); playground at {url}/, Ctrl-C stops it",
              flush=True)

    config = uvicorn.Config(build_app(server, on_ready=ready), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=3, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    return 0

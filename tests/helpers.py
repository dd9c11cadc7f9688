"""Small helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator

import numpy as np
import torch


def random_vectors(count: int, dim: int, seed: int) -> torch.Tensor:
    """(count, dim) float64 standard normal, seeded."""
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((count, dim)))


def state_dicts(base) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Copies of every base weight (UNet, text encoder, VAE), for bit-identity checks."""
    out = {}
    for prefix, module in (("unet", base.unet), ("text", base.text_encoder), ("vae", base.pipeline.vae)):
        out |= {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    return out


@contextlib.contextmanager
def http_receiver() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A real HTTP server on loopback standing in for a Pushgateway: records (method, path, body) of every
    POST/PUT and answers GET /-/healthy. Yields (its URL, the recorded requests)."""
    received: list[tuple[str, str, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        do_PUT = do_POST

        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/-/healthy" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()

"""Small helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

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


PROCESSOR = {"crop_size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 0}


def write_tiny_clip(folder: Path) -> Path:
    """A tiny random CLIPModel (text width 32, the tiny base's) saved as a real CLIP folder would be: config,
    safetensors, tokenizer, image-processor config."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from perfusion.vocab import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return folder


class CuttableProxy:
    """A loopback TCP proxy to host:port that a test can cut, as a storage outage would: while cut, every
    open connection is closed and new ones are accepted and closed at once (a load balancer with no healthy
    backend). `endpoint` is its http:// URL."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.refused = 0  # connections turned away while cut
        self._cut = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            for connection in self._open:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            if self._cut.is_set():
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
            with self._lock:
                self._open.discard(end)

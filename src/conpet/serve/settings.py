"""What ``conpet serve`` accepts and how much: one frozen object, checked before anything starts."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields
from pathlib import Path

from conpet.errors import ConfigError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class ServeSettings:
    """``conpet serve``'s settings (CLI flags of the same names). Defaults are safe: loopback only,
    bounded bodies, prompts, answers, rows and requests in flight."""

    host: str = "127.0.0.1"
    port: int = 8000
    """0: any free port (the line ``conpet serve: listening on URL`` says which)."""
    api_key_file: str | None = None
    """A file whose first line is the key clients send as ``Authorization: Bearer KEY``; required
    to bind any address but loopback."""
    max_batch: int = 32
    """Most rows one forward pass (or one generation) serves: concurrent requests are gathered up to it ..."""
    max_wait_ms: float = 5.0
    """... or until this long after the first one arrived."""
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    """Longest prompt or row accepted, in tokens (default: the run's ``train.max_length``: what it trained on)."""
    max_tokens: int = 512
    """Largest ``max_tokens`` a request may ask for."""
    max_rows: int = 64
    """Most inputs (rows to classify, prompts) in one request."""
    max_in_flight: int = 256
    """Requests being answered at once; beyond it 429 with ``Retry-After``."""
    timeout_s: float = 120.0
    """A request not answered by then gets 503."""
    watch_s: float = 2.0
    """How often the run's records are read for newly finished tasks (0: only ``POST /admin/reload``)."""
    upstream: str | None = None
    """An OpenAI-compatible server holding the run's exported adapters by task name (``conpet export
    --to vllm``, served by vLLM): generation requests are routed here and answered there."""
    upstream_key_file: str | None = None
    """The key the upstream server expects, if any (first line of the file)."""
    seed: int | None = None
    device: str | None = None

    def check(self) -> "ServeSettings":
        """Refuse contradictory or unsafe settings with one line naming the flag."""
        for f in ("max_batch", "max_body_bytes", "max_tokens", "max_rows", "max_in_flight"):
            if getattr(self, f) < 1:
                raise ConfigError(f"--{f.replace('_', '-')}: must be at least 1, got {getattr(self, f)}")
        for f in ("max_wait_ms", "watch_s"):
            if getattr(self, f) < 0:
                raise ConfigError(f"--{f.replace('_', '-')}: must be 0 or more, got {getattr(self, f)}")
        if self.timeout_s <= 0:
            raise ConfigError(f"--timeout-s: must be more than 0, got {self.timeout_s}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"--max-prompt-tokens: must be at least 1, got {self.max_prompt_tokens}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port: must be between 0 and 65535, got {self.port}")
        if not is_loopback(self.host) and not self.api_key_file:
            raise ConfigError(f"--host {self.host}: binding an address other than loopback needs --api-key-file "
                              f"(clients then send Authorization: Bearer KEY)")
        if self.api_key_file:
            read_api_key(self.api_key_file)
        if self.upstream is not None and not self.upstream.startswith(("http://", "https://")):
            raise ConfigError(f"--upstream {self.upstream}: give the server's base URL, e.g. http://127.0.0.1:8001/v1")
        if self.upstream_key_file:
            read_api_key(self.upstream_key_file)
        return self

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: str) -> str:
    """The key in ``path`` (its first line, stripped); a clear error for a missing or short one."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--api-key-file {path}: no such file")
    lines = p.read_text(encoding="utf-8").splitlines()
    key = lines[0].strip() if lines else ""
    if len(key) < 16:
        raise ConfigError(f"{path}:1: the API key must be at least 16 characters")
    return key

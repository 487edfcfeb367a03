"""The server's limits: what one request may ask and how much work the server takes on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ServeLimits:
    """Every limit is checked before a request reaches the model; beyond one, the request gets a 4xx error."""

    max_rows: int = 16
    """Requests decoded together (rows of the running batch); more wait in the queue."""
    max_queue: int = 64
    """Requests waiting for a row; beyond it a request is refused with 429 and Retry-After."""
    max_request_bytes: int = 16 * 2**20
    """Size of a request body."""
    max_image_bytes: int = 8 * 2**20
    """Size of one encoded image (after base64 decoding)."""
    max_image_pixels: int = 4096 * 4096
    """Width x height of a decoded image; checked from the header before decoding (decompression bombs)."""
    max_total_tokens: Optional[int] = None
    """Prompt tokens + max_tokens of one request (default: what the LLM's positions allow, less the visual
    prefix)."""
    default_max_tokens: int = 64
    """max_tokens of a request that does not set it."""
    request_timeout_s: float = 120.0
    """A request still unfinished after this long ends there, with finish_reason 'length'."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, how long in-flight requests may still run before the server exits."""

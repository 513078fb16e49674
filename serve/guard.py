"""The API server's gate: with an API key set, every route needs it; every request stays within the caps.

vLLM's own key check guards only paths under /v1 (and a few other prefixes), which leaves /invocations,
/generative_scoring, /scale_elastic_ep, /tokenize, /pooling and whatever a later vLLM adds open. This
ASGI middleware inverts that: with a key, everything needs it except the routes in ``open_paths``
(/health, and /metrics only when asked for), so routes added by a new vLLM are closed by default.
It also refuses a request whose ``n`` or output length is above the server's caps (vLLM has no flag for
``n``), so one request cannot tie the engine up.

vLLM adds it through its ``--middleware`` option (``mixsparse serve`` passes it); it is configured by
``MIXSPARSE_GUARD`` (JSON, set by ``mixsparse serve``) and reads the key the way vLLM does
(``--api-key``, else ``VLLM_API_KEY``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass

ENVIRONMENT = "MIXSPARSE_GUARD"
N_FIELDS = ("n", "best_of")
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_new_tokens")


@dataclass(frozen=True)
class GuardSettings:
    max_n: int = 16
    max_tokens: int = 4096
    public_metrics: bool = False

    def to_environment(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_environment(cls) -> "GuardSettings":
        return cls(**json.loads(os.environ[ENVIRONMENT])) if os.environ.get(ENVIRONMENT) else cls()

    @property
    def open_paths(self) -> tuple[str, ...]:
        return ("/health", "/metrics") if self.public_metrics else ("/health",)


API_KEY_ENVIRONMENT = "VLLM_API_KEY"  # vLLM's own: it reads the key from there when --api-key is not given


def api_keys(scope) -> list[str]:
    """The keys vLLM itself was started with: ``--api-key`` (several allowed), else ``VLLM_API_KEY``."""
    args = getattr(getattr(scope.get("app"), "state", None), "args", None)
    return [key for key in (getattr(args, "api_key", None) or [os.environ.get(API_KEY_ENVIRONMENT)]) if key]


def violation(body: bytes, settings: GuardSettings) -> str | None:
    """Why a JSON request body asks for more than the caps allow, or None."""
    try:
        request = json.loads(body)
    except ValueError:
        return None  # not JSON: the route answers it with its own 400
    if not isinstance(request, dict):
        return None
    for fields in (request, request.get("sampling_params")):  # /inference/v1/generate nests them
        if not isinstance(fields, dict):
            continue
        for name in N_FIELDS:
            if isinstance(fields.get(name), (int, float)) and fields[name] > settings.max_n:
                return f"{name}={fields[name]} is above this server's limit of {settings.max_n} (--max-n)"
        for name in TOKEN_FIELDS:
            if isinstance(fields.get(name), (int, float)) and fields[name] > settings.max_tokens:
                return (
                    f"{name}={fields[name]} is above this server's limit of {settings.max_tokens} output "
                    f"tokens per request (--max-output-tokens)"
                )
    return None


class RequestGuard:
    """Pure ASGI middleware (streaming responses pass through untouched)."""

    def __init__(self, app, settings: GuardSettings | None = None):
        self.app = app
        self.settings = settings or GuardSettings.from_environment()
        self.hashes: list[bytes] | None = None

    def authorized(self, scope) -> bool:
        if self.hashes is None:
            self.hashes = [hashlib.sha256(key.encode()).digest() for key in api_keys(scope)]
        if not self.hashes:
            return True
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if path in self.settings.open_paths or scope.get("method") == "OPTIONS":  # CORS preflights carry no key
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        given = hashlib.sha256(token.encode("latin-1")).digest()
        # compare against every key, always, so the time taken says nothing about which one nearly matched
        return scheme.lower() == "bearer" and sum(secrets.compare_digest(given, h) for h in self.hashes) > 0

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if not self.authorized(scope):
            return await self.reply(
                scope, send, 401, "a valid API key is required (Authorization: Bearer <key>)", "AuthenticationError"
            )
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        received, body = [], b""
        while True:  # read the body once, check it, then hand the same messages on
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        problem = violation(body, self.settings)
        if problem:
            return await self.reply(scope, send, 400, problem, "BadRequestError")

        async def replay():
            return received.pop(0) if received else await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    async def reply(scope, send, status: int, message: str, kind: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": message})
            return
        body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

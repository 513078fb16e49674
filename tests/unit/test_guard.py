"""The API server's gate, on the app vLLM builds with the arguments `mixsparse serve` passes (no engine)."""

import asyncio
import json
import re
import typing

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'mixsparse[cpu]')")

from mixsparse.serve.guard import ENVIRONMENT, GuardSettings, RequestGuard  # noqa: E402
from mixsparse.serve.server import ServeOptions, vllm_argv  # noqa: E402

KEY = "s3cret"


def vllm_app(tmp_path, monkeypatch, guard=GuardSettings(), api_key=KEY):
    """vLLM's FastAPI app as its api_server builds it, with every task it can serve, so every router is there;
    the guard's settings travel as `mixsparse serve` sends them, in the environment."""
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.tasks import SupportedTask
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = vllm_argv(ServeOptions(str(tmp_path), api_key=api_key, guard=guard), tmp_path, cuda=False)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    monkeypatch.setenv(ENVIRONMENT, guard.to_environment())
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    return build_app(args, typing.get_args(SupportedTask), None)


def routes(app):
    """(kind, path, method) for every entry of the app's route table; path parameters filled in."""
    from starlette.routing import Mount, WebSocketRoute

    found = []
    for route in app.routes:
        path = re.sub(r"\{[^}]*\}", "x", route.path)
        if isinstance(route, WebSocketRoute):
            found.append(("websocket", path, None))
        elif isinstance(route, Mount):
            found.append(("http", path, "GET"))
        else:
            found += [("http", path, method) for method in sorted(route.methods or {"GET"}) if method != "HEAD"]
    return found


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    with pytest.MonkeyPatch.context() as monkeypatch:
        yield TestClient(vllm_app(tmp_path_factory.mktemp("m"), monkeypatch), raise_server_exceptions=False)


def status(client, kind, path, method, headers=None):
    from starlette.websockets import WebSocketDisconnect

    if kind == "websocket":
        try:
            with client.websocket_connect(path, headers=headers or {}):
                return 101
        except WebSocketDisconnect as closed:
            return 401 if closed.code == 1008 else closed.code
        except Exception:  # the route itself failed without an engine: it was let through
            return 500
    return client.request(method, path, headers=headers, json={}).status_code


def test_with_a_key_every_route_but_health_needs_it(client):
    table = routes(client.app)
    assert {
        ("http", "/invocations", "POST"),
        ("http", "/scale_elastic_ep", "POST"),
        ("http", "/generative_scoring", "POST"),
        ("http", "/metrics", "GET"),
    } <= set(table)
    open_routes = [(k, p, m) for k, p, m in table if status(client, k, p, m) != 401]
    assert open_routes == [("http", "/health", "GET")]
    wrong = {"Authorization": "Bearer not-the-key"}
    assert [r for r in table if r[1] != "/health" and status(client, *r, headers=wrong) != 401] == []


def test_the_key_opens_the_routes(client):
    right = {"Authorization": f"Bearer {KEY}"}
    assert client.get("/version", headers=right).status_code == 200
    assert client.post("/invocations", headers=right, json={}).status_code != 401


def test_public_metrics_is_a_flag(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    public = TestClient(
        vllm_app(tmp_path, monkeypatch, GuardSettings(public_metrics=True)), raise_server_exceptions=False
    )
    assert public.get("/metrics").status_code == 200
    assert public.post("/invocations", json={}).status_code == 401


def test_without_a_key_nothing_is_refused_for_want_of_one(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    plain = TestClient(vllm_app(tmp_path, monkeypatch, api_key=None), raise_server_exceptions=False)
    assert plain.get("/version").status_code == 200 and plain.get("/metrics").status_code == 200


@pytest.mark.parametrize(
    "payload, flag",
    [
        ({"n": 1000, "messages": []}, "--max-n"),
        ({"best_of": 17, "prompt": "x"}, "--max-n"),
        ({"max_tokens": 100000, "messages": []}, "--max-output-tokens"),
        ({"max_completion_tokens": 5000, "messages": []}, "--max-output-tokens"),
        ({"max_output_tokens": 5000, "input": "x"}, "--max-output-tokens"),
        ({"sampling_params": {"n": 64}, "token_ids": [1]}, "--max-n"),
    ],
)
def test_requests_above_the_caps_are_refused(client, payload, flag):
    right = {"Authorization": f"Bearer {KEY}"}
    for path in ("/v1/chat/completions", "/invocations", "/inference/v1/generate"):
        reply = client.post(path, headers=right, json=payload)
        assert reply.status_code == 400 and flag in reply.json()["error"]["message"]


def test_a_checked_body_reaches_the_route_unchanged():
    seen = {}

    async def echo(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen["body"] = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    chunks = [json.dumps({"n": 2, "max_tokens": 8, "messages": [{"role": "user", "content": "hi " * 500}]}).encode()]
    chunks = [chunks[0][:700], chunks[0][700:]]
    messages = [{"type": "http.request", "body": c, "more_body": i == 0} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    asyncio.run(RequestGuard(echo, GuardSettings(max_n=2, max_tokens=8))(scope, receive, send))
    assert sent[0]["status"] == 200 and seen["body"] == b"".join(chunks)


def test_requests_without_max_tokens_are_bounded_through_vllms_own_option(tmp_path):
    argv = vllm_argv(ServeOptions("m", guard=GuardSettings(max_tokens=512)), tmp_path, cuda=False)
    assert json.loads(argv[argv.index("--override-generation-config") + 1]) == {"max_new_tokens": 512}
    mine = vllm_argv(
        ServeOptions(
            "m", guard=GuardSettings(max_tokens=512), vllm_args=['--override-generation-config={"temperature": 0.5}']
        ),
        tmp_path,
        False,
    )
    assert argv.count("--override-generation-config") == 1
    assert json.loads(mine[mine.index("--override-generation-config") + 1]) == {
        "temperature": 0.5,
        "max_new_tokens": 512,
    }

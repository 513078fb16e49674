"""A stand-in OpenAI streaming server for bench tests: /health, /metrics, streamed completions.

    python stub_openai.py PORT DELAY [DIE_AFTER]

Each request streams ``max_tokens`` chunks ``DELAY`` seconds apart; after DIE_AFTER requests the process
exits, as a crashed engine would.
"""

import asyncio
import json
import os
import sys

from aiohttp import web

PORT, DELAY = int(sys.argv[1]), float(sys.argv[2])
DIE_AFTER = int(sys.argv[3]) if len(sys.argv) > 3 else None
served = 0


async def health(request):
    return web.Response(text="")


async def metrics(request):
    return web.Response(
        text='mixsparse_weight_bytes{kind="dense_equivalent"} 1000.0\n'
        'mixsparse_weight_bytes{kind="stored"} 600.0\n'
        'mixsparse_weight_bytes{kind="resident"} 700.0\n'
    )


async def complete(request):
    global served
    served += 1
    if DIE_AFTER is not None and served > DIE_AFTER:
        os._exit(1)
    body = await request.json()
    chat = "messages" in body
    prompt = body["prompt"] if not chat else body["messages"][0]["content"].split()
    reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await reply.prepare(request)
    for _ in range(body["max_tokens"]):
        await asyncio.sleep(DELAY)
        choice = {"delta": {"content": "x"}} if chat else {"text": "x"}
        await reply.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
    usage = {"prompt_tokens": len(prompt), "completion_tokens": body["max_tokens"]}
    await reply.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
    return reply


app = web.Application()
app.add_routes(
    [
        web.get("/health", health),
        web.get("/metrics", metrics),
        web.post("/v1/completions", complete),
        web.post("/v1/chat/completions", complete),
    ]
)
web.run_app(app, host="127.0.0.1", port=PORT, print=None)

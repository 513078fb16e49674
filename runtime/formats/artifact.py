"""The mixsparse artifact on disk: an HF-style directory whose 2:4 modules are packed.

``config.json`` carries::

    quantization_config = {
      "quant_method": "mixsparse", "format_version": 1, "dtype": "bfloat16",
      "modules": {qualified_name: {"format": "2:4" | "n:m" | "unstructured",
                                   "storage": "packed24" | "dense",
                                   "shape": [out, in], "sparsity": float}},
      "groups": [[names fused as one GEMM by vLLM, e.g. q/k/v], ...],
      "files": {safetensors file name: size in bytes}
    }

A 2:4 module is stored packed (``<name>.values`` + ``<name>.meta``) only when every module of its
fused group is 2:4: vLLM loads a group as one GEMM, and one storage per GEMM keeps its loader simple.
Every other module is stored as a plain ``<name>.weight`` (zeros included). Nothing device-specific
(cuSPARSELt/CUTLASS layouts) is ever written.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixsparse.runtime.atomic import atomic_dir
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats.packed24 import Packed24

QUANT_METHOD = "mixsparse"
FORMAT_VERSION = 1
PACKED24 = "packed24"
DENSE = "dense"
SHARD_BYTES = 4 * 1024**3

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise MixsparseError(f"unknown dtype {name!r}; expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class ModuleEntry:
    format: str  # "2:4", "4:8", ..., or "unstructured"
    storage: str  # PACKED24 or DENSE
    shape: tuple[int, int]
    sparsity: float

    def to_json(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, name: str, data: dict) -> "ModuleEntry":
        try:
            entry = cls(str(data["format"]), str(data["storage"]), tuple(int(s) for s in data["shape"]),
                        float(data["sparsity"]))
        except (KeyError, TypeError, ValueError) as error:
            raise MixsparseError(f"module {name}: malformed entry in quantization_config ({error!r})") from None
        if entry.storage not in (PACKED24, DENSE) or len(entry.shape) != 2:
            raise MixsparseError(f"module {name}: unknown storage {entry.storage!r} or shape {list(entry.shape)}")
        return entry


@dataclass
class ArtifactConfig:
    """The parsed and checked ``quantization_config`` of an artifact."""

    path: Path
    dtype: torch.dtype
    modules: dict[str, ModuleEntry]
    groups: list[list[str]]
    files: dict[str, int]
    hf_config: dict = field(repr=False, default_factory=dict)

    @property
    def packed(self) -> dict[str, ModuleEntry]:
        return {name: e for name, e in self.modules.items() if e.storage == PACKED24}


def storage_for(modules: dict[str, tuple[str, tuple[int, int]]], groups: Iterable[Iterable[str]]) -> dict[str, str]:
    """Choose each module's storage: packed only when its whole fused group is 2:4 (see module doc)."""
    group_of = {name: tuple(group) for group in groups for name in group}

    def packable(name: str) -> bool:
        fmt, shape = modules.get(name, ("dense", (0, 0)))
        return fmt == "2:4" and shape[1] % 4 == 0

    return {
        name: PACKED24 if all(packable(member) for member in group_of.get(name, (name,))) else DENSE
        for name in modules
    }


def is_artifact(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        quant = json.loads(config.read_text()).get("quantization_config") or {}
        return quant.get("quant_method") == QUANT_METHOD
    except (OSError, ValueError, AttributeError):  # unreadable, not UTF-8/JSON, or not an object
        return False


def read_config(path: str | os.PathLike) -> ArtifactConfig:
    """Parse an artifact's config and check that its files are all there at their recorded sizes."""
    path = Path(path)
    config_file = path / "config.json"
    try:
        hf_config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise MixsparseError(f"{path} is not a mixsparse artifact: config.json is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MixsparseError(f"{config_file} is not valid JSON ({error})") from None
    except OSError as error:
        raise MixsparseError(f"cannot read {config_file} ({error.strerror})") from None
    if not isinstance(hf_config, dict) or not isinstance(hf_config.get("quantization_config") or {}, dict):
        raise MixsparseError(f"{config_file} is not a model config (a JSON object with a quantization_config "
                             f"object)")
    quant = hf_config.get("quantization_config") or {}
    if quant.get("quant_method") != QUANT_METHOD:
        raise MixsparseError(f"{path} is not a mixsparse artifact (quantization_config.quant_method is "
                             f"{quant.get('quant_method')!r})")
    version = quant.get("format_version")
    if version != FORMAT_VERSION:
        raise MixsparseError(f"{path}: artifact format_version {version!r} is not supported by this mixsparse "
                             f"(it reads version {FORMAT_VERSION})")
    modules = {name: ModuleEntry.from_json(name, data) for name, data in (quant.get("modules") or {}).items()}
    files = {str(k): int(v) for k, v in (quant.get("files") or {}).items()}
    if not files:
        raise MixsparseError(f"{path}: quantization_config records no weight files")
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise MixsparseError(f"{path}: weight file {name} is missing")
        actual = file.stat().st_size
        if actual != size:
            raise MixsparseError(f"{path}: weight file {name} is {actual} bytes but the artifact records {size} "
                                 f"(truncated or corrupt)")
    return ArtifactConfig(path, parse_dtype(quant.get("dtype", "bfloat16")), modules,
                          [list(g) for g in quant.get("groups") or []], files, hf_config)


def iter_tensors(config: ArtifactConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stored tensor, file by file, loaded lazily from safetensors."""
    for name in config.files:
        try:
            with safe_open(config.path / name, framework="pt") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        except Exception as error:  # safetensors raises its own SafetensorError on a bad header
            raise MixsparseError(f"{config.path}: cannot read {name} ({error})") from None


def load_tensors(config: ArtifactConfig) -> dict[str, torch.Tensor]:
    tensors = dict(iter_tensors(config))
    check_tensors(config, tensors)
    return tensors


def check_tensors(config: ArtifactConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Each recorded module has its tensors, at the recorded shapes."""
    for name, entry in config.modules.items():
        if entry.storage == PACKED24:
            missing = [k for k in (f"{name}.values", f"{name}.meta") if k not in tensors]
            if missing:
                raise MixsparseError(f"{config.path}: tensor {missing[0]} of 2:4 module {name} is missing")
            Packed24.from_tensors(tensors[f"{name}.values"], tensors[f"{name}.meta"], entry.shape, name)
        else:
            weight = tensors.get(f"{name}.weight")
            if weight is None:
                raise MixsparseError(f"{config.path}: tensor {name}.weight is missing")
            if tuple(weight.shape) != entry.shape:
                raise MixsparseError(f"{config.path}: {name}.weight has shape {list(weight.shape)}, "
                                     f"the artifact records {list(entry.shape)}")


_FLOAT_DTYPES = ("BF16", "F16", "F32")
_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def tensor_headers(config: ArtifactConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, safetensors dtype)} from the files' headers; no tensor data is read."""
    headers = {}
    for name in config.files:
        try:
            with safe_open(config.path / name, framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_slice(key)
                    headers[key] = (tuple(tensor.get_shape()), tensor.get_dtype())
        except Exception as error:  # safetensors raises its own SafetensorError on a bad header
            raise MixsparseError(f"{config.path}: cannot read {name} ({error})") from None
    return headers


def check_headers(config: ArtifactConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every recorded module's tensors exist with the shapes its entry implies (headers only)."""
    headers = tensor_headers(config)
    for name, entry in config.modules.items():
        out_features, in_features = entry.shape
        if entry.storage == PACKED24:
            expected = {f"{name}.values": (out_features, in_features // 2),
                        f"{name}.meta": (out_features, (in_features + 7) // 8)}
        else:
            expected = {f"{name}.weight": (out_features, in_features)}
        for key, shape in expected.items():
            if key not in headers:
                raise MixsparseError(f"{config.path}: tensor {key} of module {name} is missing")
            if headers[key][0] != shape:
                raise MixsparseError(f"{config.path}: {key} has shape {list(headers[key][0])}, the artifact "
                                     f"records {list(shape)} for module {name}")
        if entry.storage == PACKED24 and headers[f"{name}.meta"][1] != "U8":
            raise MixsparseError(f"{config.path}: {name}.meta is stored as {headers[f'{name}.meta'][1]}, a 2:4 "
                                 f"index tensor must be U8 (uint8)")
        if entry.storage == PACKED24 and headers[f"{name}.values"][1] not in _FLOAT_DTYPES:
            raise MixsparseError(f"{config.path}: {name}.values is stored as {headers[f'{name}.values'][1]}, "
                                 f"expected a floating dtype ({', '.join(_FLOAT_DTYPES)})")
    packed = config.packed
    orphans = sorted(key for key in headers
                     if key.endswith((".values", ".meta")) and key.rsplit(".", 1)[0] not in packed)
    if orphans:
        raise MixsparseError(f"{config.path}: tensor {orphans[0]} is packed 2:4 but quantization_config.modules "
                             f"does not record its module {orphans[0].rsplit('.', 1)[0]} as packed")
    return headers


def check_meta(config: ArtifactConfig) -> None:
    """Every packed module's 2:4 indices are valid; reads only the ``.meta`` tensors (1/16 of the bytes)."""
    wanted = {f"{name}.meta": (name, entry) for name, entry in config.packed.items()}
    for file in config.files:
        try:
            with safe_open(config.path / file, framework="pt") as handle:
                for key in wanted.keys() & set(handle.keys()):
                    name, entry = wanted[key]
                    Packed24.check_meta(handle.get_tensor(key), entry.shape, name)
        except MixsparseError as error:
            raise MixsparseError(f"{config.path}: {error}") from None
        except Exception as error:  # safetensors raises its own SafetensorError on a bad header
            raise MixsparseError(f"{config.path}: cannot read {file} ({error})") from None


def weight_bytes(config: ArtifactConfig) -> dict[str, int]:
    """Bytes of all stored tensors, read from the safetensors headers (no tensor is loaded).

    ``stored``: as on disk; ``dense_equivalent``: the same model with every packed module dense;
    ``packed_stored`` / ``packed_dense_equivalent``: the packed 2:4 modules alone.
    """
    stored = 0
    for shape, dtype in tensor_headers(config).values():
        count = 1
        for size in shape:
            count *= size
        stored += count * _DTYPE_BYTES[dtype]
    element = torch.empty((), dtype=config.dtype).element_size()
    packed_dense = sum(e.shape[0] * e.shape[1] * element for e in config.packed.values())
    packed_stored = sum(e.shape[0] * (e.shape[1] // 2 * element + (e.shape[1] + 7) // 8)
                        for e in config.packed.values())
    return {"stored": stored, "dense_equivalent": stored - packed_stored + packed_dense,
            "packed_stored": packed_stored, "packed_dense_equivalent": packed_dense}


def packed_module(config: ArtifactConfig, tensors: dict[str, torch.Tensor], name: str) -> Packed24:
    entry = config.modules[name]
    return Packed24.from_tensors(tensors[f"{name}.values"], tensors[f"{name}.meta"], entry.shape, name)


def dense_state_dict(config: ArtifactConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain state dict, packed modules unpacked to dense weights (exact)."""
    state = dict(tensors)
    for name in config.packed:
        state[f"{name}.weight"] = packed_module(config, tensors, name).unpack()
        del state[f"{name}.values"], state[f"{name}.meta"]
    return state


def write(
    out: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    modules: dict[str, ModuleEntry],
    groups: list[list[str]],
    hf_config: dict,
    dtype: torch.dtype,
    write_extra: Callable[[Path], None] = lambda directory: None,
    overwrite: bool = False,
) -> None:
    """Write an artifact atomically. ``state_dict`` holds dense weights; packed modules are packed here."""
    tensors = {}
    for key, tensor in state_dict.items():
        tensors[key] = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
    for name, entry in modules.items():
        if entry.storage == PACKED24:
            packed = Packed24.pack(tensors.pop(f"{name}.weight"), name)
            tensors[f"{name}.values"], tensors[f"{name}.meta"] = packed.values, packed.meta
    with atomic_dir(out, overwrite=overwrite) as tmp:
        files = _save_sharded(tmp, tensors)
        config = dict(hf_config)
        config.pop("quantization_config", None)
        config["dtype"] = config["torch_dtype"] = dtype_name(dtype)
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "dtype": dtype_name(dtype),
            "modules": {name: entry.to_json() for name, entry in modules.items()},
            "groups": groups,
            "files": files,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_extra(tmp)


def _save_sharded(directory: Path, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name, shard in zip(names, shards):
        save_file(shard, directory / name, metadata={"format": "pt"})
    return {name: (directory / name).stat().st_size for name in names}

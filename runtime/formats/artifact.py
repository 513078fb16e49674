"""The mixsparse artifact on disk: an HF-style directory whose sparse modules are stored compressed.

``config.json`` carries::

    quantization_config = {
      "quant_method": "mixsparse", "format_version": 2, "dtype": "bfloat16",
      "modules": {qualified_name: {"format": "2:4" | "n:m" | "unstructured",
                                   "storage": "packed24" | "bitmask" | "dense",
                                   "shape": [out, in], "sparsity": float,
                                   "nnz": int (bitmask only: the length of its values)}},
      "groups": [[names fused as one GEMM by vLLM, e.g. q/k/v], ...],
      "files": {safetensors file name: size in bytes}
    }

A 2:4 module is stored packed (``<name>.values`` + ``<name>.meta``, see packed24.py) when every module
of its fused group is 2:4: that is the packing the GPU's 2:4 kernels take. Any other pruned module
(unstructured, N:M, or 2:4 in a group that is not all 2:4) is stored bitmask-compressed
(``<name>.values`` + ``<name>.mask`` + ``<name>.offsets``, see bitmask.py) when that is smaller than
dense, else as a plain ``<name>.weight`` (zeros included), like every unpruned module. ``nnz`` lets a
loader allocate a bitmask module's values without reading tensors. Nothing device-specific
(cuSPARSELt/CUTLASS layouts) is ever written. Version 1 (no bitmask storage) is still read.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixsparse.runtime.atomic import atomic_dir
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats.bitmask import Bitmask
from mixsparse.runtime.formats.packed24 import Packed24
from mixsparse.runtime.json_files import read_json

QUANT_METHOD = "mixsparse"
FORMAT_VERSION = 2  # what this mixsparse writes
READ_VERSIONS = (1, 2)  # version 1 is version 2 without bitmask storage
PACKED24 = "packed24"
BITMASK = "bitmask"
DENSE = "dense"
STORAGES = (PACKED24, BITMASK, DENSE)
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
    storage: str  # one of STORAGES
    shape: tuple[int, int]
    sparsity: float
    nnz: int | None = None  # BITMASK: kept weights (the values' length); the writer sets it from the packing

    def to_json(self) -> dict:
        data = {**asdict(self), "shape": list(self.shape)}
        if self.nnz is None:
            del data["nnz"]
        return data

    @classmethod
    def from_json(cls, name: str, data: dict) -> "ModuleEntry":
        try:
            nnz = data.get("nnz")
            entry = cls(
                str(data["format"]),
                str(data["storage"]),
                tuple(int(s) for s in data["shape"]),
                float(data["sparsity"]),
                None if nnz is None else int(nnz),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise MixsparseError(f"module {name}: malformed entry in quantization_config ({error!r})") from None
        if entry.storage not in STORAGES or len(entry.shape) != 2:
            raise MixsparseError(f"module {name}: unknown storage {entry.storage!r} or shape {list(entry.shape)}")
        size = entry.shape[0] * entry.shape[1]
        if entry.storage == BITMASK and not (entry.nnz is not None and 0 <= entry.nnz <= size):
            raise MixsparseError(
                f"module {name}: a bitmask entry needs nnz between 0 and {size}, got {data.get('nnz')!r}"
            )
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

    @property
    def bitmask(self) -> dict[str, ModuleEntry]:
        return {name: e for name, e in self.modules.items() if e.storage == BITMASK}

    @property
    def compressed(self) -> dict[str, ModuleEntry]:
        """Modules stored without a ``<name>.weight`` tensor (packed 2:4 or bitmask)."""
        return {name: e for name, e in self.modules.items() if e.storage != DENSE}


def storage_for(
    modules: dict[str, tuple[str, tuple[int, int]]],
    groups: Iterable[Iterable[str]],
    nnz: dict[str, int] | None = None,
    element_size: int = 2,
) -> dict[str, str]:
    """Choose each module's storage (see module doc): packed 2:4 when its whole fused group is 2:4, else
    bitmask when its ``nnz`` kept weights of ``element_size`` bytes take fewer bytes than dense, else dense."""
    group_of = {name: tuple(group) for group in groups for name in group}
    nnz = nnz or {}

    def packable(name: str) -> bool:
        fmt, shape = modules.get(name, ("dense", (0, 0)))
        return fmt == "2:4" and shape[1] % 4 == 0

    def smaller_as_bitmask(name: str) -> bool:
        shape = modules[name][1]
        return (
            name in nnz and Bitmask.stored_nbytes(shape, nnz[name], element_size) < shape[0] * shape[1] * element_size
        )

    return {
        name: PACKED24
        if all(packable(member) for member in group_of.get(name, (name,)))
        else BITMASK
        if smaller_as_bitmask(name)
        else DENSE
        for name in modules
    }


def check_version(version, what: str, reader: str) -> None:
    if version not in READ_VERSIONS or isinstance(version, bool):
        raise MixsparseError(
            f"{what} format_version {version!r} is not supported by this {reader} (it reads "
            f"versions {', '.join(map(str, READ_VERSIONS))})"
        )


def is_artifact(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        quant = json.loads(config.read_text()).get("quantization_config") or {}
        return quant.get("quant_method") == QUANT_METHOD
    except (OSError, ValueError, AttributeError):  # unreadable, not UTF-8/JSON, or not an object
        return False


def parse_quantization(quant: dict, what: str, reader: str) -> tuple[dict[str, ModuleEntry], list[list[str]]]:
    """(modules, fused groups) of a ``quantization_config``: the one parser behind ``read_config`` and the vLLM
    plugin's ``from_config``. ``what``/``reader`` name the artifact and the reader in version errors."""
    check_version(quant.get("format_version"), what, reader)
    modules = {name: ModuleEntry.from_json(name, data) for name, data in (quant.get("modules") or {}).items()}
    bitmask = [name for name, entry in modules.items() if entry.storage == BITMASK]
    if bitmask and quant.get("format_version") < 2:
        raise MixsparseError(
            f"{what}: module {bitmask[0]} is stored as {BITMASK}, which format_version "
            f"{quant.get('format_version')} does not have (corrupt config?)"
        )
    return modules, [list(g) for g in quant.get("groups") or []]


def read_config(path: str | os.PathLike) -> ArtifactConfig:
    """Parse an artifact's config and check that its files are all there at their recorded sizes."""
    path = Path(path)
    config_file = path / "config.json"
    hf_config = read_json(config_file, "model config", f"{path} is not a mixsparse artifact: config.json is missing")
    if not isinstance(hf_config, dict) or not isinstance(hf_config.get("quantization_config") or {}, dict):
        raise MixsparseError(f"{config_file} is not a model config (a JSON object with a quantization_config object)")
    quant = hf_config.get("quantization_config") or {}
    if quant.get("quant_method") != QUANT_METHOD:
        raise MixsparseError(
            f"{path} is not a mixsparse artifact (quantization_config.quant_method is {quant.get('quant_method')!r})"
        )
    modules, groups = parse_quantization(quant, f"{path}: artifact", "mixsparse")
    files = {str(k): int(v) for k, v in (quant.get("files") or {}).items()}
    if not files:
        raise MixsparseError(f"{path}: quantization_config records no weight files")
    for name, size in files.items():
        # judged by the name, not the resolved path, so files that are symlinks (as in the HF cache) stay fine
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise MixsparseError(
                f"{path}: quantization_config.files names {name!r}, outside the artifact directory; an artifact's "
                f"weight files are named relative to it"
            )
        file = path / name
        if not file.is_file():
            raise MixsparseError(f"{path}: weight file {name} is missing")
        actual = file.stat().st_size
        if actual != size:
            raise MixsparseError(
                f"{path}: weight file {name} is {actual} bytes but the artifact records {size} (truncated or corrupt)"
            )
    return ArtifactConfig(path, parse_dtype(quant.get("dtype", "bfloat16")), modules, groups, files, hf_config)


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
    """Each recorded module has its tensors, at the recorded shapes; every floating tensor is in the recorded
    dtype."""
    for key, tensor in sorted(tensors.items()):
        if tensor.is_floating_point() and tensor.dtype != config.dtype:
            raise MixsparseError(
                f"{config.path}: tensor {key} is stored as {dtype_name(tensor.dtype)}, but the artifact records "
                f"dtype {dtype_name(config.dtype)}"
            )
    for name, entry in config.modules.items():
        if entry.storage == PACKED24:
            missing = [k for k in (f"{name}.values", f"{name}.meta") if k not in tensors]
            if missing:
                raise MixsparseError(f"{config.path}: tensor {missing[0]} of 2:4 module {name} is missing")
            Packed24.from_tensors(tensors[f"{name}.values"], tensors[f"{name}.meta"], entry.shape, name)
        elif entry.storage == BITMASK:
            missing = [k for k in (f"{name}.values", f"{name}.mask", f"{name}.offsets") if k not in tensors]
            if missing:
                raise MixsparseError(f"{config.path}: tensor {missing[0]} of bitmask module {name} is missing")
            bitmask_module(config, tensors, name)
        else:
            weight = tensors.get(f"{name}.weight")
            if weight is None:
                raise MixsparseError(f"{config.path}: tensor {name}.weight is missing")
            if tuple(weight.shape) != entry.shape:
                raise MixsparseError(
                    f"{config.path}: {name}.weight has shape {list(weight.shape)}, "
                    f"the artifact records {list(entry.shape)}"
                )


_FLOAT_DTYPES = ("BF16", "F16", "F32")
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_DTYPE_BYTES = {
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "U8": 1,
    "I8": 1,
    "I16": 2,
    "I32": 4,
    "I64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


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
    """Every recorded module's tensors exist with the shapes its entry implies, and every floating tensor is
    stored in the artifact's recorded dtype (headers only)."""
    headers = tensor_headers(config)
    stored = SAFETENSORS_DTYPES[config.dtype]
    for key, (_, dtype) in sorted(headers.items()):
        if dtype in _FLOAT_DTYPES and dtype != stored:
            raise MixsparseError(
                f"{config.path}: tensor {key} is stored as {dtype}, but the artifact records dtype "
                f"{dtype_name(config.dtype)} ({stored}); its bytes would be read as another type"
            )
    for name, entry in config.modules.items():
        out_features, in_features = entry.shape
        if entry.storage == PACKED24:
            expected = {
                f"{name}.values": (out_features, in_features // 2),
                f"{name}.meta": (out_features, (in_features + 7) // 8),
            }
        elif entry.storage == BITMASK:
            expected = {
                f"{name}.values": (entry.nnz,),
                f"{name}.mask": (out_features, (in_features + 7) // 8),
                f"{name}.offsets": (out_features + 1,),
            }
        else:
            expected = {f"{name}.weight": (out_features, in_features)}
        for key, shape in expected.items():
            if key not in headers:
                raise MixsparseError(f"{config.path}: tensor {key} of module {name} is missing")
            if headers[key][0] != shape:
                raise MixsparseError(
                    f"{config.path}: {key} has shape {list(headers[key][0])}, the artifact "
                    f"records {list(shape)} for module {name}"
                )
        if entry.storage == PACKED24 and headers[f"{name}.meta"][1] != "U8":
            raise MixsparseError(
                f"{config.path}: {name}.meta is stored as {headers[f'{name}.meta'][1]}, a 2:4 "
                f"index tensor must be U8 (uint8)"
            )
        if entry.storage == BITMASK:
            for key, dtype in ((f"{name}.mask", "U8"), (f"{name}.offsets", "I64")):
                if headers[key][1] != dtype:
                    raise MixsparseError(
                        f"{config.path}: {key} is stored as {headers[key][1]}, a bitmask "
                        f"{key.rsplit('.', 1)[1]} tensor must be {dtype}"
                    )
        if entry.storage != DENSE and headers[f"{name}.values"][1] not in _FLOAT_DTYPES:
            raise MixsparseError(
                f"{config.path}: {name}.values is stored as {headers[f'{name}.values'][1]}, "
                f"expected a floating dtype ({', '.join(_FLOAT_DTYPES)})"
            )
    for key in sorted(headers):
        module, _, suffix = key.rpartition(".")
        storage = config.modules[module].storage if module in config.modules else DENSE
        expected_storage = {
            "values": (PACKED24, BITMASK),
            "meta": (PACKED24,),
            "mask": (BITMASK,),
            "offsets": (BITMASK,),
        }.get(suffix)
        # a plain model may own a tensor named *.mask or *.offsets; beside a .values it is a packed module's
        if (
            expected_storage
            and storage not in expected_storage
            and (suffix in ("values", "meta") or f"{module}.values" in headers)
        ):
            kind = {"meta": "packed 2:4", "values": "packed"}.get(suffix, "bitmask")
            raise MixsparseError(
                f"{config.path}: tensor {key} is {kind} but quantization_config.modules does not "
                f"record its module {module} as {'bitmask' if kind == 'bitmask' else 'packed'} "
                f"(it is {storage})"
            )
    return headers


def check_meta(config: ArtifactConfig) -> None:
    """Every packed module's 2:4 indices are valid, and every bitmask module's mask agrees with its offsets
    and nnz; reads only those index tensors (1/16 of the bytes)."""
    wanted = {f"{name}.meta": (name, entry) for name, entry in config.packed.items()}
    wanted.update({f"{name}.mask": (name, entry) for name, entry in config.bitmask.items()})
    where = {key: file for file in config.files for key in _keys(config, file)}
    for key, (name, entry) in sorted(wanted.items()):
        file = where.get(key)
        if file is None:
            raise MixsparseError(f"{config.path}: tensor {key} of module {name} is missing")
        try:
            if entry.storage == PACKED24:
                Packed24.check_meta(_tensor(config, file, key), entry.shape, name)
                continue
            offsets_file = where.get(f"{name}.offsets")
            if offsets_file is None:
                raise MixsparseError(f"{config.path}: tensor {name}.offsets of module {name} is missing")
            nnz = Bitmask.check_index(
                _tensor(config, file, key), _tensor(config, offsets_file, f"{name}.offsets"), entry.shape, name
            )
            if nnz != entry.nnz:
                raise MixsparseError(f"{name}: its mask keeps {nnz} weights, the artifact records nnz {entry.nnz}")
        except MixsparseError as error:
            raise MixsparseError(f"{config.path}: {error}") from None


def _keys(config: ArtifactConfig, file: str) -> list[str]:
    try:
        with safe_open(config.path / file, framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:  # safetensors raises its own SafetensorError on a bad header
        raise MixsparseError(f"{config.path}: cannot read {file} ({error})") from None


def _tensor(config: ArtifactConfig, file: str, key: str) -> torch.Tensor:
    try:
        with safe_open(config.path / file, framework="pt") as handle:
            return handle.get_tensor(key)
    except Exception as error:  # safetensors raises its own SafetensorError on a bad header
        raise MixsparseError(f"{config.path}: cannot read {key} from {file} ({error})") from None


def weight_bytes(config: ArtifactConfig) -> dict[str, int]:
    """Bytes of all stored tensors, read from the safetensors headers (no tensor is loaded).

    ``stored``: as on disk; ``dense_equivalent``: the same model with every compressed module dense;
    ``packed_stored`` / ``packed_dense_equivalent``: the packed 2:4 modules alone;
    ``bitmask_stored`` / ``bitmask_dense_equivalent``: the bitmask modules alone.
    """
    stored = 0
    for shape, dtype in tensor_headers(config).values():
        count = 1
        for size in shape:
            count *= size
        stored += count * _DTYPE_BYTES[dtype]
    return _weight_bytes(stored, config.modules, config.dtype)


def planned_weight_bytes(
    state_dict: dict[str, torch.Tensor], modules: dict[str, ModuleEntry], dtype: torch.dtype
) -> dict[str, int]:
    """``weight_bytes`` of the artifact ``write`` would make of these, counted before writing (so a model card
    can quote them); every bitmask entry needs its ``nnz``."""
    element = torch.empty((), dtype=dtype).element_size()
    compressed = {f"{name}.weight" for name, entry in modules.items() if entry.storage != DENSE}
    missing = [name for name, entry in modules.items() if entry.storage == BITMASK and entry.nnz is None]
    if missing:
        raise MixsparseError(f"bitmask module {missing[0]} has no nnz: its stored bytes are unknown")
    plain = sum(
        t.numel() * (element if t.is_floating_point() else t.element_size())
        for key, t in state_dict.items()
        if key not in compressed
    )
    sizes = _weight_bytes(0, modules, dtype)
    return _weight_bytes(plain + sizes["packed_stored"] + sizes["bitmask_stored"], modules, dtype)


def _weight_bytes(stored: int, modules: dict[str, ModuleEntry], dtype: torch.dtype) -> dict[str, int]:
    element = torch.empty((), dtype=dtype).element_size()
    packed = [e for e in modules.values() if e.storage == PACKED24]
    bitmask = [e for e in modules.values() if e.storage == BITMASK]
    packed_dense = sum(e.shape[0] * e.shape[1] * element for e in packed)
    packed_stored = sum(e.shape[0] * (e.shape[1] // 2 * element + (e.shape[1] + 7) // 8) for e in packed)
    bitmask_dense = sum(e.shape[0] * e.shape[1] * element for e in bitmask)
    bitmask_stored = sum(Bitmask.stored_nbytes(e.shape, e.nnz or 0, element) for e in bitmask)
    return {
        "stored": stored,
        "dense_equivalent": stored - packed_stored + packed_dense - bitmask_stored + bitmask_dense,
        "packed_stored": packed_stored,
        "packed_dense_equivalent": packed_dense,
        "bitmask_stored": bitmask_stored,
        "bitmask_dense_equivalent": bitmask_dense,
    }


def packed_module(config: ArtifactConfig, tensors: dict[str, torch.Tensor], name: str) -> Packed24:
    entry = config.modules[name]
    return Packed24.from_tensors(tensors[f"{name}.values"], tensors[f"{name}.meta"], entry.shape, name)


def bitmask_module(config: ArtifactConfig, tensors: dict[str, torch.Tensor], name: str) -> Bitmask:
    """A bitmask module's weight, checked against its entry (shape, nnz) and itself."""
    entry = config.modules[name]
    weight = Bitmask.from_tensors(
        tensors[f"{name}.values"], tensors[f"{name}.mask"], tensors[f"{name}.offsets"], entry.shape, name
    )
    if weight.nnz != entry.nnz:
        raise MixsparseError(f"{config.path}: {name} keeps {weight.nnz} weights, the artifact records nnz {entry.nnz}")
    return weight


def dense_state_dict(config: ArtifactConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain state dict, packed and bitmask modules unpacked to dense weights (exact)."""
    state = dict(tensors)
    for name in config.packed:
        state[f"{name}.weight"] = packed_module(config, tensors, name).unpack()
        del state[f"{name}.values"], state[f"{name}.meta"]
    for name in config.bitmask:
        state[f"{name}.weight"] = bitmask_module(config, tensors, name).unpack()
        del state[f"{name}.values"], state[f"{name}.mask"], state[f"{name}.offsets"]
    return state


def write(
    out: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    modules: dict[str, ModuleEntry],
    groups: list[list[str]],
    hf_config: dict,
    dtype: torch.dtype,
    texts: dict[str, str] | None = None,
    pretrained: Iterable = (),
    overwrite: bool = False,
) -> ArtifactConfig:
    """Write an artifact atomically and return its config. ``state_dict`` holds dense weights; compressed
    modules are packed here (a bitmask entry's ``nnz`` is set from its packing in the stored dtype, and must
    agree with one it already has). ``texts`` are written as files beside the weights (model card, plan);
    each of ``pretrained`` (tokenizer, generation config) saves itself there with ``save_pretrained``."""
    tensors = {}
    for key, tensor in state_dict.items():
        tensors[key] = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
    modules = dict(modules)
    for name, entry in modules.items():
        if entry.storage == PACKED24:
            packed = Packed24.pack(tensors.pop(f"{name}.weight"), name)
            tensors[f"{name}.values"], tensors[f"{name}.meta"] = packed.values, packed.meta
        elif entry.storage == BITMASK:
            compressed = Bitmask.pack(tensors.pop(f"{name}.weight"), name)
            tensors[f"{name}.values"], tensors[f"{name}.mask"] = compressed.values, compressed.mask
            tensors[f"{name}.offsets"] = compressed.offsets
            if entry.nnz is not None and entry.nnz != compressed.nnz:
                # the caller counted bytes (the model card's) from its nnz: they would not be the stored ones
                raise MixsparseError(f"{name}: entry records nnz {entry.nnz}, its packing keeps {compressed.nnz}")
            modules[name] = replace(entry, nnz=compressed.nnz)
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
        for item in pretrained:
            item.save_pretrained(tmp)
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
    return read_config(out)


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
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name, shard in zip(names, shards):
        save_file(shard, directory / name, metadata={"format": "pt"})
    return {name: (directory / name).stat().st_size for name in names}

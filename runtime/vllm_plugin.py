"""The vLLM plugin: quantization method "mixsparse", so artifacts load in vLLM with no extra flag.

A thin adapter (docs/design.md, Serving). The ``vllm.general_plugins`` entry point calls ``register()`` in every vLLM
process, which registers the config idempotently (importing this module registers nothing); the class lives
at module level because vLLM pickles the config into its engine and worker processes. The quantization
config is parsed by ``artifact.parse_quantization`` (as ``mixsparse`` itself reads it); what each process
holds is reported through ``runtime/resident.py``.

``get_quant_method`` decides per fused layer as vLLM builds it (qkv_proj = q/k/v, gate_up_proj = gate/up,
o_proj, down_proj): the 2:4 method when every member is stored packed, the compressed method when members
mix bitmask / packed / dense (one joined weight on the CPU kernel), vLLM's unquantized method when none is
compressed. Packed weights load through vLLM's own weight loaders (tensor-parallel sharding included: the
packed dims are input dims, which the loaders narrow by the parameter's own width). After loading, on CPU
the packed weight is converted in place into the native kernel's compressed layout (no dense copy is ever
made); on CUDA sm80+ it is unpacked on the device and compressed for a 2:4 kernel. Either way the layer
keeps the prepared ``SparseWeight`` and runs it through ``runtime.sparse_linear.sparse_linear``. Where no
kernel can run it is kept dense and run by vLLM's own dense GEMM (exact; one warning says why).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import get_quantization_config, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import ModelWeightParameter

from mixsparse.runtime import resident
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats import artifact
from mixsparse.runtime.formats.packed24 import Packed24
from mixsparse.runtime.sparse_linear import prepare, sparse_linear
from mixsparse.runtime.weight import DENSE, SparseWeight

log = logging.getLogger(__name__)
UNLOADED = 0xFF  # meta nibble 0xF means i0 == i1 == 3: impossible in a real packing, so it marks unloaded rows


def register() -> None:
    """Entry point (vllm.general_plugins), called in every vLLM process: registers the "mixsparse" method.
    Idempotent, and the only side effect of this plugin: importing the module registers nothing."""
    try:
        if get_quantization_config(artifact.QUANT_METHOD) is MixsparseConfig:
            return
    except ValueError:  # not registered yet
        pass
    register_quantization_config(artifact.QUANT_METHOD)(MixsparseConfig)


class MixsparseConfig(QuantizationConfig):
    def __init__(self, modules: dict[str, artifact.ModuleEntry], groups: list[list[str]]):
        super().__init__()
        self.modules = modules
        self.groups = groups

    def get_name(self) -> str:
        return artifact.QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # below sm80 the exact dense fallback runs

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MixsparseConfig":
        try:
            return cls(*artifact.parse_quantization(config, "mixsparse artifact", "plugin"))
        except MixsparseError as error:  # vLLM reports a ValueError from a quantization config
            raise ValueError(str(error)) from None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self.modules = hf_to_vllm_mapper.apply_dict(self.modules)

    def members(self, prefix: str) -> list[str]:
        """The checkpoint modules behind a vLLM layer: qkv_proj -> q_proj, k_proj, v_proj."""
        parent, _, leaf = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(leaf)
        if not shards:
            return [prefix]
        return [f"{parent}.{shard}" if parent else shard for shard in shards]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        members = self.members(prefix)
        storage = [self.modules[m].storage if m in self.modules else artifact.DENSE for m in members]
        if not isinstance(layer, LinearBase):
            if artifact.BITMASK in storage:  # a pruned, untied lm_head: vLLM builds it as an embedding
                raise ValueError(
                    f"mixsparse: {prefix} is stored bitmask-compressed, which vLLM's lm_head cannot "
                    f"take; prune without --prune-lm-head, or `mixsparse export --dense` the artifact"
                )
            return None  # embeddings, lm_head, attention: vLLM's defaults
        if all(s == artifact.PACKED24 for s in storage):
            return Sparse24LinearMethod(prefix)
        if any(s != artifact.DENSE for s in storage):
            return CompressedLinearMethod(prefix, [(m, self.modules.get(m)) for m in members])
        return DenseLinearMethod(prefix)


class DenseLinearMethod(UnquantizedLinearMethod):
    """vLLM's own dense method, recording the bytes it keeps resident."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        nbytes = layer.weight.numel() * layer.weight.element_size()
        super().process_weights_after_loading(layer)
        resident.report(self.prefix, nbytes, nbytes, "dense")


class _PreparedMethod(LinearMethodBase):
    """What both compressed methods do once a weight is prepared: hold it, report it, run it."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.dense_method: UnquantizedLinearMethod | None = None

    def _install(self, layer: torch.nn.Module, weight: SparseWeight, dense_bytes: int) -> None:
        if weight.backend == DENSE:
            # vLLM's dense path (oneDNN prepacking on CPU): the fallback is as fast as a dense model
            layer.register_parameter("weight", torch.nn.Parameter(weight.values, requires_grad=False))
            self.dense_method = UnquantizedLinearMethod()
            self.dense_method.process_weights_after_loading(layer)
        else:
            # buffers too, so what walks the layer's state (device moves, memory accounting) sees the tensors
            for name, tensor in weight.tensors.items():
                layer.register_buffer(f"mixsparse_{name}", tensor, persistent=False)
            layer.mixsparse_weight = weight  # built once here: apply only reads it
        resident.report(self.prefix, weight.nbytes, dense_bytes, weight.backend)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.dense_method is not None:
            return self.dense_method.apply(layer, x, bias)
        return sparse_linear(x, layer.mixsparse_weight, bias)


class Sparse24LinearMethod(_PreparedMethod):
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        loader = extra_weight_attrs.pop("weight_loader")
        if input_size_per_partition % 4 or (input_size_per_partition != input_size and input_size_per_partition % 8):
            raise ValueError(
                f"mixsparse: {self.prefix} has {input_size_per_partition} inputs per tensor-parallel "
                f"rank; packed 2:4 weights need a multiple of 8 per rank (4 without sharding)"
            )
        rows = sum(output_partition_sizes)
        values = ModelWeightParameter(
            data=torch.empty(rows, input_size_per_partition // 2, dtype=params_dtype),
            input_dim=1,
            output_dim=0,
            weight_loader=loader,
        )
        meta = ModelWeightParameter(
            data=torch.full((rows, (input_size_per_partition + 7) // 8), UNLOADED, dtype=torch.uint8),
            input_dim=1,
            output_dim=0,
            weight_loader=loader,
        )
        layer.register_parameter("values", values)
        layer.register_parameter("meta", meta)
        layer.mixsparse_shape = (rows, input_size_per_partition)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        try:
            packed = Packed24.from_tensors(layer.values.data, layer.meta.data, layer.mixsparse_shape, self.prefix)
        except MixsparseError as error:
            raise ValueError(
                f"mixsparse: {self.prefix}: packed tensors missing from the checkpoint or corrupt ({error})"
            ) from None
        device = layer.values.device
        dense_bytes = packed.shape[0] * packed.shape[1] * layer.values.element_size()
        prepared = prepare(packed, device, layer.values.dtype)
        del layer.values, layer.meta
        self._install(layer, prepared, dense_bytes)


class CompressedLinearMethod(_PreparedMethod):
    """A vLLM layer whose members are stored in any mix of bitmask, packed 2:4 and dense (an MSP plan gives
    q, k and v their own ratios): the members are joined into one compressed weight, run as one GEMM by the
    native CPU kernel. Members load through this method's own loader (vLLM's loaders assume fixed-width
    rows, which bitmask values are not), so tensor parallelism is not supported for such layers. Where the
    CPU kernel cannot run (CUDA, or not built) the joined weight is unpacked: vLLM's dense GEMM, exact."""

    KINDS = {
        artifact.BITMASK: ("values", "mask", "offsets"),
        artifact.PACKED24: ("values", "meta"),
        artifact.DENSE: ("weight",),
    }

    def __init__(self, prefix: str, members: list[tuple[str, artifact.ModuleEntry | None]]):
        super().__init__(prefix)
        self.members = members

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        from vllm.model_executor.utils import set_weight_attrs

        if input_size_per_partition != input_size or sum(output_partition_sizes) != output_size:
            raise ValueError(
                f"mixsparse: {self.prefix} holds bitmask-compressed weights, which are served without "
                f"tensor parallelism (use --tensor-parallel-size 1)"
            )
        if len(output_partition_sizes) != len(self.members):
            raise ValueError(
                f"mixsparse: {self.prefix} has {len(output_partition_sizes)} output partitions but the "
                f"artifact names {len(self.members)} members ({[m for m, _ in self.members]})"
            )
        storages = [entry.storage if entry else artifact.DENSE for _, entry in self.members]
        layer.mixsparse_parts = [{} for _ in self.members]
        layer.mixsparse_shape = (output_size, input_size)
        layer.mixsparse_sizes = list(output_partition_sizes)
        layer.mixsparse_dtype = params_dtype
        shard_index = {"q": 0, "k": 1, "v": 2}

        def load(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
            index = 0 if shard_id is None else shard_index.get(shard_id, shard_id)
            kind = param.mixsparse_kind
            if kind not in self.KINDS[storages[index]]:
                raise ValueError(
                    f"mixsparse: {self.members[index][0]} is recorded as {storages[index]} but the "
                    f"checkpoint holds its .{kind}"
                )
            layer.mixsparse_parts[index][kind] = loaded.detach().clone()  # the checkpoint may be memory-mapped

        for kind in dict.fromkeys(k for s in storages for k in self.KINDS[s]):  # each kind the members use, once
            param = torch.nn.Parameter(torch.empty(0, dtype=params_dtype), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": load, "mixsparse_kind": kind})
            layer.register_parameter(kind, param)

    def _member_rows(self, layer: torch.nn.Module, index: int):
        from mixsparse.runtime import cpu_sparse
        from mixsparse.runtime.formats.bitmask import Bitmask

        name, entry = self.members[index]
        parts, dtype = layer.mixsparse_parts[index], layer.mixsparse_dtype
        shape = (layer.mixsparse_sizes[index], layer.mixsparse_shape[1])
        storage = entry.storage if entry else artifact.DENSE
        missing = [k for k in self.KINDS[storage] if k not in parts]
        if missing:
            raise ValueError(f"mixsparse: {name}: {', '.join('.' + k for k in missing)} missing from the checkpoint")
        try:
            if storage == artifact.BITMASK:
                weight = Bitmask.from_tensors(parts["values"], parts["mask"], parts["offsets"], shape, name)
                return weight.to_rows(dtype)
            if storage == artifact.PACKED24:
                packed = Packed24.from_tensors(parts["values"], parts["meta"], shape, name)
                return cpu_sparse.from_packed24(packed.values, packed.meta, shape, dtype)
            return Bitmask.pack(parts["weight"].to(dtype), name).to_rows(dtype)  # a dense member joins compressed
        except MixsparseError as error:
            raise ValueError(f"mixsparse: {self.prefix}: {error}") from None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        from mixsparse.runtime import cpu_sparse
        from mixsparse.runtime.formats.bitmask import Bitmask

        rows = cpu_sparse.join([self._member_rows(layer, i) for i in range(len(self.members))])
        for kind in [k for k, _ in layer.named_parameters(recurse=False) if k != "bias"]:
            delattr(layer, kind)
        del layer.mixsparse_parts
        dense_bytes = rows.shape[0] * rows.shape[1] * torch.empty(0, dtype=layer.mixsparse_dtype).element_size()
        prepared = prepare(
            Bitmask.from_rows(rows),
            torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda", torch.cuda.current_device()),
            layer.mixsparse_dtype,
        )
        self._install(layer, prepared, dense_bytes)

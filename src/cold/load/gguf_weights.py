"""A GGUF file's weights into safetensors shards in one dtype, one tensor at a time.

The file is memory-mapped (`gguf.GGUFReader`); each tensor is dequantised on its own
(`gguf.quants.dequantize`, in row chunks), renamed and fixed as transformers does when it loads a
GGUF (its `get_gguf_hf_weights_map` and per-architecture `TensorProcessor`s: the Llama q/k
permutation reversed, Gemma's norms stored as `w + 1`, ...), cast to the target dtype and added to
a shard of at most `SHARD_BYTES`. Peak memory is about one shard plus one float32 tensor, never a
float32 copy of the model.

Architectures that transformers (5.19) loads through its newer GGUF path (`GGUF_ARCHS`, Qwen 3.5)
have no `TensorProcessor`; for them the whole model is loaded by transformers in the target dtype
and its tensors written the same way.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from cold.errors import ColdError

SHARD_BYTES = 1 << 30  # at most 1 GiB per safetensors file (a larger single tensor gets a file of its own)
DEQUANT_CHUNK_ELEMENTS = 1 << 24  # dequantise at most this many values at once (64 MiB of float32)
INDEX_NAME = "model.safetensors.index.json"

_BLOCK = re.compile(r"blk\.(\d+)\.")


class ShardWriter:
    """Collects tensors and writes them as safetensors files of at most `max_bytes` each.

    `close()` names a single file `model.safetensors` and several `model-0000k-of-0000n.safetensors`
    with a `model.safetensors.index.json`, the layouts `from_pretrained` reads.
    """

    def __init__(self, directory: Path, max_bytes: int = SHARD_BYTES):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[Path] = []
        self.weight_map: dict[str, int] = {}  # tensor name -> index into self.files
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self.pending:
            raise ColdError(f"tensor {name} would be written twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def names(self) -> set[str]:
        return set(self.weight_map) | set(self.pending)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.directory / f"model-{len(self.files) + 1:05d}.safetensors.partial"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.weight_map.update({name: len(self.files) for name in self.pending})
        self.files.append(path)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Write what is left, give the files their final names and, for several, write the index."""
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            self.files[0].rename(self.directory / "model.safetensors")
            return
        count = len(self.files)
        final = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for path, name in zip(self.files, final):
            path.rename(self.directory / name)
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {name: final[i] for name, i in sorted(self.weight_map.items())}}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_gguf_weights(gguf: Path, config, directory: Path, dtype: torch.dtype, max_shard_bytes: int = SHARD_BYTES) -> None:
    """Write the weights of `gguf` (whose transformers config is `config`) into `directory` in `dtype`."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # The GGUF's metadata as transformers parses it (a dict): the processors take its config, not the model's.
    parsed_config = load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]
    architecture, tensors = _tensors(gguf)
    writer = ShardWriter(directory, max_shard_bytes)
    if _newer_path_only(architecture):
        del tensors  # unmaps the file before transformers maps it again
        _write_whole_model(gguf, dtype, writer)
    else:
        _stream_tensors(tensors, architecture, parsed_config, config, dtype, writer,
                        progress=f"Converting {gguf.name} to {str(dtype).removeprefix('torch.')}")
    writer.close()


def _tensors(gguf: Path) -> tuple[str, list]:
    """(architecture, the `ReaderTensor`s of the file, each a view of the memory-mapped data).

    The reader itself is let go: its metadata fields (for Gemma's 262k-token vocabulary, ~700 MB
    of small numpy views) are not needed for the weights.
    """
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import read_field

    reader = GGUFReader(gguf)
    return read_field(reader, "general.architecture")[0], list(reader.tensors)


def _newer_path_only(architecture: str) -> bool:
    """Whether transformers loads this architecture only through its newer GGUF path (no TensorProcessor)."""
    try:
        from transformers.integrations.gguf import is_gguf_arch_supported
    except ImportError:  # a transformers without that path: the legacy loader covers every architecture
        return False
    return is_gguf_arch_supported(architecture)


def expected_tensor_names(model: torch.nn.Module) -> set[str]:
    """The state-dict names a checkpoint of `model` must hold: all but the tied copies (lm_head of a tied model)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return set(model.state_dict()) - tied


def _stream_tensors(tensors: list, architecture: str, parsed_config: dict, config, dtype: torch.dtype,
                    writer: ShardWriter, progress: str | None = None) -> None:
    """transformers' `load_gguf_checkpoint(return_tensors=True)`, one tensor at a time into `writer`
    (with a progress bar on stderr titled `progress`, if given)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed_config)
    with torch.device("meta"):  # names and shapes only: no memory for the weights
        skeleton = AutoModelForCausalLM.from_config(config)
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    # Some processors (MoE experts, GPT-2's lm_head) store a tensor here themselves instead of
    # returning it, merging several GGUF tensors of one block; they are written once their block is done.
    parsed = {"config": parsed_config, "tensors": {}}
    block = None
    for tensor in tqdm(tensors, desc=progress, unit="tensor", disable=progress is None, mininterval=1):
        match = _BLOCK.match(tensor.name)
        if (match[1] if match else None) != block:
            _drain(parsed["tensors"], dtype, writer)
            block = match[1] if match else None
        result = processor.process(weights=_dequantize(tensor), name=tensor.name, tensor_key_mapping=mapping,
                                   parsed_parameters=parsed)
        if result.name is None or result.name not in mapping:
            continue  # stored by the processor above, or a tensor the model has no parameter for (rope_freqs)
        writer.add(mapping[result.name], _to_torch(result.weights, dtype))
    _drain(parsed["tensors"], dtype, writer)
    missing = expected_tensor_names(skeleton) - writer.names()
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (", ..." if len(missing) > 5 else "")
        raise ColdError(f"the GGUF has no tensor for {len(missing)} parameters of {type(skeleton).__name__}: {shown}")


def _dequantize(tensor) -> np.ndarray:
    """One GGUF tensor as float32 numpy (as `gguf.quants.dequantize` gives it), in row chunks of bounded size."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data = tensor.data
    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or data.ndim < 2:
        return dequantize(data, tensor.tensor_type)
    rows = data.shape[0]
    per_row = max(1, int(tensor.n_elements) // rows)
    step = max(1, DEQUANT_CHUNK_ELEMENTS // per_row)
    first = dequantize(data[:step], tensor.tensor_type)
    if step >= rows:
        return first
    out = np.empty((rows, *first.shape[1:]), dtype=first.dtype)
    out[:step] = first
    for start in range(step, rows, step):
        out[start:start + step] = dequantize(data[start:start + step], tensor.tensor_type)
    return out


def _to_torch(weights: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A numpy array as a torch tensor of `dtype`, never sharing memory with the mapped file.

    An F32 tensor comes back from `dequantize` as a read-only view of the file: it is copied, or
    read only by the cast (which makes new memory) when the dtype differs.
    """
    array = np.ascontiguousarray(weights)
    if array.flags.writeable:
        return torch.from_numpy(array).to(dtype)
    if torch.from_numpy(np.empty(0, array.dtype)).dtype == dtype:
        return torch.from_numpy(array.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": only read here
        return torch.from_numpy(array).to(dtype)


def _drain(stored: dict, dtype: torch.dtype, writer: ShardWriter) -> None:
    for name in list(stored):
        tensor = stored.pop(name)
        writer.add(name, tensor.to(dtype))


def _write_whole_model(gguf: Path, dtype: torch.dtype, writer: ShardWriter) -> None:
    """transformers' newer GGUF path, for the architectures it alone handles: the model in `dtype`, then its tensors."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import GgufConfig

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                 quantization_config=GgufConfig(dequantize=True))
    names = expected_tensor_names(model)
    for name, tensor in model.state_dict().items():
        if name in names:
            writer.add(name, tensor.to(dtype))

"""Checkpoint I/O: validated header index, streaming reader, streaming sharded atomic writer."""

from lorasurgery.io.checkpoint import Checkpoint, open_checkpoint, read_json
from lorasurgery.io.output import (
    atomic_output_dir,
    check_output_path,
    copy_side_files,
    write_text_atomically,
)
from lorasurgery.io.safetensors_format import (
    TensorInfo,
    dtype_code_of,
    read_safetensors_header,
    torch_dtype_of,
)
from lorasurgery.io.writer import SafetensorsWriter, TensorSpec, WriteSummary, plan_shards, save_tensors

__all__ = [
    "Checkpoint",
    "SafetensorsWriter",
    "TensorInfo",
    "TensorSpec",
    "WriteSummary",
    "atomic_output_dir",
    "check_output_path",
    "copy_side_files",
    "dtype_code_of",
    "open_checkpoint",
    "plan_shards",
    "read_json",
    "read_safetensors_header",
    "save_tensors",
    "torch_dtype_of",
    "write_text_atomically",
]

"""A PEFT LoRA adapter on disk: its config, its modules (r, alpha, scale, layout) and saved tensors.

PEFT's save grammar, under the prefix `base_model.model.` (an adapter-name segment such as
`.default` is tolerated where older PEFT versions left it):
  <m>.lora_A.weight (r, in)        <m>.lora_B.weight (out, r)       <m>.lora_B.bias (lora_bias)
  <m>.lora_embedding_A (r, vocab)  <m>.lora_embedding_B (dim, r)    <m>.lora_magnitude_vector (DoRA)
  <m>.base_layer.<p>, <m>.<p>      tensors that replace the base's <m>.<p> (saved biases,
                                    modules_to_save, targeted embeddings)
  <m>.modules_to_save.<p>, <m>.original_module.<p>   duplicates PEFT writes with bias="all"
Only the safetensors header is read when loading; tensors are read on demand.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lorasurgery.adapter.config import AdapterConfig, parse_adapter_config
from lorasurgery.errors import AdapterError, CheckpointError, UnsupportedError
from lorasurgery.io.checkpoint import Checkpoint, open_checkpoint, read_json

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>(?!(?:weight|bias)$)[^.]+))?(?:\.(?P<param>weight|bias))?$"
)
_KOHYA_MARKERS = (".lora_down.weight", ".lora_up.weight", ".hada_w1_a", ".lokr_w1")


@dataclass
class LoraModule:
    """One LoRA-adapted layer: ΔW = scale · B @ A, laid out like the base weight.

    Read alone, a linear module's layout follows adapter_config.json's fan_in_fan_out, which is only
    a hint (PEFT decides per layer); against a base, `laid_out` sets what the model's structure
    (lorasurgery.architecture) decides."""

    name: str  # module path, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear" | "embedding" | "conv"
    r: int
    alpha: float
    scale: float
    fan_in_fan_out: bool
    dora: bool
    lora_bias: bool
    shape: tuple[int, ...]  # the base weight's stored shape, which ΔW must match
    a_key: str
    b_key: str
    bias_key: str | None = None
    magnitude_key: str | None = None
    layout: str = "adapter"  # who decided fan_in_fan_out: adapter | structure | option | shape

    def laid_out(self, fan_in_fan_out: bool, layout: str) -> LoraModule:
        """This module with its base weight stored (in, out) when `fan_in_fan_out`, else (out, in)."""
        if self.kind != "linear":
            return self
        out_features, in_features = self.features
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        return dataclasses.replace(self, fan_in_fan_out=fan_in_fan_out, shape=shape, layout=layout)

    @property
    def features(self) -> tuple[int, int]:
        """(out, in) of a linear module, whatever its layout."""
        return (self.shape[1], self.shape[0]) if self.fan_in_fan_out else (self.shape[0], self.shape[1])

    @property
    def base_weight_name(self) -> str:
        return f"{self.name}.weight"


@dataclass
class Adapter:
    path: Path  # the adapter folder (or file)
    config: AdapterConfig
    checkpoint: Checkpoint  # the adapter's weight file, header only
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # base-relative name -> adapter key
    format: str = "peft"

    @property
    def tensors(self):
        return self.checkpoint.tensors

    @property
    def weights_file(self) -> Path:
        return self.checkpoint.files[0]

    def read(self, key: str, device: str = "cpu"):
        return self.checkpoint.read(key, device)

    def read_factors(self, module: str, device: str = "cpu"):
        """(A, B) as saved: A (r, in) or (r, vocab) or (r, in, *k); B (out, r) or (dim, r) or (out, r, *1)."""
        lora = self.modules[module]
        return self.read(lora.a_key, device), self.read(lora.b_key, device)

    def read_magnitude(self, module: str, device: str = "cpu"):
        key = self.modules[module].magnitude_key
        return self.read(key, device) if key else None

    def read_lora_bias(self, module: str, device: str = "cpu"):
        key = self.modules[module].bias_key
        return self.read(key, device) if key else None


def _find_weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise AdapterError(f"{folder}: no {' or '.join(WEIGHT_FILES)} in this adapter folder")


def _refuse_kohya(path: Path, names) -> None:
    if any(marker in name for name in names for marker in _KOHYA_MARKERS):
        raise UnsupportedError(
            f"{path}: this is a kohya / sd-scripts LoRA (lora_down/lora_up/alpha keys), which is not "
            f"supported yet; lorasurgery reads PEFT adapters (adapter_config.json + adapter_model.safetensors)"
        )


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read an adapter folder's config and weight header; validate its modules against the config."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"{path}: no such adapter folder")
    if path.is_file():  # a lone weights file: recognise kohya files, refuse the rest clearly
        try:
            names = open_checkpoint(path).tensors
        except CheckpointError:
            names = {}
        _refuse_kohya(path, names)
        raise AdapterError(
            f"{path}: expected a PEFT adapter folder with {CONFIG_FILE} and adapter_model.safetensors"
        )
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        for candidate in sorted(path.glob("*.safetensors"))[:4]:
            try:
                _refuse_kohya(candidate, open_checkpoint(candidate).tensors)
            except CheckpointError:
                pass
        raise AdapterError(f"{path}: no {CONFIG_FILE}; not a PEFT adapter folder")
    try:
        raw = read_json(config_path, CONFIG_FILE)
    except CheckpointError as error:
        raise AdapterError(str(error)) from None
    config = parse_adapter_config(raw, config_path)
    checkpoint = open_checkpoint(_find_weights(path))
    _refuse_kohya(checkpoint.files[0], checkpoint.tensors)
    adapter = Adapter(path=path, config=config, checkpoint=checkpoint)
    _index_tensors(adapter)
    if not adapter.modules and not adapter.replacements:
        raise AdapterError(f"{checkpoint.files[0]}: the adapter holds no LoRA tensors")
    return adapter


def _relative(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def _index_tensors(adapter: Adapter) -> None:
    file = adapter.checkpoint.files[0]
    parts: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}  # base-relative name -> key, from <m>.<p> and <m>.base_layer.<p>
    duplicates: dict[str, str] = {}  # from <m>.modules_to_save.<p>: used only without <m>.<p>
    for key in adapter.tensors:
        relative = _relative(key)
        if ".token_adapter." in relative or relative.endswith("trainable_tokens_delta"):
            raise UnsupportedError(f"{file}: trainable tokens ({relative}) are not supported yet")
        match = _LORA_KEY.match(relative)
        if match:
            part = match["part"] + (".bias" if match["param"] == "bias" else "")
            parts.setdefault(match["module"], {})[part] = key
        elif ".original_module." in relative:
            continue  # PEFT's copy of the untouched base module
        elif ".modules_to_save." in relative:
            module, param = relative.split(".modules_to_save.", 1)
            duplicates[f"{module}.{param.removeprefix('default.')}"] = key
        elif ".base_layer." in relative:
            module, param = relative.split(".base_layer.", 1)
            saved[f"{module}.{param}"] = key
        else:
            saved[relative] = key
    for name, key in duplicates.items():
        saved.setdefault(name, key)
    adapter.replacements = saved
    for module, found in parts.items():
        adapter.modules[module] = _make_module(adapter.config, adapter.tensors, file, module, found)


def _make_module(
    config: AdapterConfig, tensors: dict, file: Path, module: str, found: dict[str, str]
) -> LoraModule:
    where = f"{file}: module {module}"
    embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
    a_key = found.get("lora_embedding_A" if embedding else "lora_A")
    b_key = found.get("lora_embedding_B" if embedding else "lora_B")
    if not a_key or not b_key:
        missing = "lora_A/lora_embedding_A" if not a_key else "lora_B/lora_embedding_B"
        raise AdapterError(f"{where}: has no {missing} tensor")
    a_shape, b_shape = tensors[a_key].shape, tensors[b_key].shape
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise AdapterError(f"{where}: lora factors must be at least 2-D, got {a_shape} and {b_shape}")
    r = a_shape[0]
    if r == 0:
        raise AdapterError(f"{where}: rank r = 0")
    if b_shape[1] != r:
        raise AdapterError(f"{where}: lora_A has rank {r} but lora_B has shape {list(b_shape)}")
    expected_r = config.rank_of(module)
    if expected_r != r:
        raise AdapterError(
            f"{where}: tensors have rank {r} but adapter_config.json gives r = {expected_r} for this module"
        )
    if embedding:
        kind, shape = "embedding", (a_shape[1], b_shape[0])  # (vocab, dim)
    elif len(a_shape) > 2:
        kind, shape = "conv", (b_shape[0], *a_shape[1:])  # (out, in/groups, *kernel)
    else:
        kind = "linear"
        shape = (a_shape[1], b_shape[0]) if config.fan_in_fan_out else (b_shape[0], a_shape[1])
    magnitude_key = found.get("lora_magnitude_vector")
    if magnitude_key:
        features = math.prod(tensors[magnitude_key].shape)
        expected = b_shape[0]  # per output feature; the embedding's per dimension, also B's rows
        if features != expected:
            raise AdapterError(f"{where}: DoRA magnitude has {features} values, expected {expected}")
    bias_key = found.get("lora_B.bias")
    return LoraModule(
        name=module,
        kind=kind,
        r=r,
        alpha=config.alpha_of(module),
        scale=config.scale_of(module, r),
        fan_in_fan_out=config.fan_in_fan_out and kind == "linear",
        dora=magnitude_key is not None,
        lora_bias=bias_key is not None,
        shape=tuple(shape),
        a_key=a_key,
        b_key=b_key,
        bias_key=bias_key,
        magnitude_key=magnitude_key,
    )

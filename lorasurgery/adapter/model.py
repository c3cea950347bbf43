"""A PEFT LoRA adapter on disk: its config, its modules (r, alpha, scale, layout) and saved tensors.

PEFT's save grammar, under the prefix `base_model.model.` (an adapter-name segment such as
`.default` is tolerated where older PEFT versions left it):
  <m>.lora_A.weight (r, in)        <m>.lora_B.weight (out, r)       <m>.lora_B.bias (lora_bias)
  <m>.lora_embedding_A (r, vocab)  <m>.lora_embedding_B (dim, r)    <m>.lora_magnitude_vector (DoRA)
  <m>.base_layer.<p>, <m>.<p>      tensors that replace the base's <m>.<p> (saved biases,
                                    modules_to_save, targeted embeddings)
  <m>.modules_to_save.<p>, <m>.original_module.<p>   duplicates PEFT writes with bias="all"
  <emb>.token_adapter.trainable_tokens_delta (n, dim)  rows of <emb>.weight (trainable_token_indices)
  <m>.lora_A.weight, <m>.base_layer.lora_A.weight …   LoRA on <m>'s nn.Parameters (target_parameters):
                                    PEFT nests one wrapper per parameter, the first-registered innermost;
                                    a 3-D expert parameter (E, …) has lora_A (r·E, in), lora_B (out, r·E)
  <mha>.lora_A.weight + <mha>.base_layer.out_proj.lora_A.weight   nn.MultiheadAttention: the first
                                    updates <mha>.in_proj_weight, the second <mha>.out_proj.weight
Only the safetensors header is read when loading; tensors are read on demand. The keys written
(extract, resize, combine, export) come from the same grammar: `lora_keys`, `saved_key`,
`base_layer_key`.
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
from lorasurgery.io.quantization import recognise, refusal

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>(?!(?:weight|bias)$)[^.]+))?(?:\.(?P<param>weight|bias))?$"
)
_KOHYA_MARKERS = (".lora_down.weight", ".lora_up.weight", ".hada_w1_a", ".lokr_w1")


@dataclass(frozen=True)
class LoraKeys:
    """The keys PEFT saves one module's LoRA tensors under."""

    A: str  # lora_A (r, in) / lora_embedding_A (r, vocab)
    B: str  # lora_B (out, r) / lora_embedding_B (dim, r)
    bias: str  # lora_B's bias (lora_bias)
    magnitude: str  # DoRA's lora_magnitude_vector


def lora_keys(module: str, kind: str = "linear") -> LoraKeys:
    """The keys of module `module`'s LoRA tensors (an embedding's are lora_embedding_A/B)."""
    prefix = PEFT_PREFIX + module
    if kind == "embedding":
        A, B = f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"
    else:
        A, B = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
    return LoraKeys(A, B, f"{prefix}.lora_B.bias", f"{prefix}.lora_magnitude_vector")


def saved_key(name: str) -> str:
    """The key of a tensor saved whole (modules_to_save), `name` relative to the model."""
    return PEFT_PREFIX + name


def base_layer_key(module: str, parameter: str) -> str:
    """The key of a LoRA-wrapped layer's own parameter saved beside it (bias="lora_only", a targeted
    embedding's weight): the tensor the wrapped layer shares with a tie."""
    return f"{PEFT_PREFIX}{module}.base_layer.{parameter}"


def is_base_layer(key: str) -> bool:
    """Whether a saved tensor's key is a wrapped layer's own parameter (see base_layer_key)."""
    return ".base_layer." in key


@dataclass
class LoraModule:
    """One LoRA-adapted layer: ΔW = scale · B @ A, laid out like the base weight.

    Read alone, a linear module's layout follows adapter_config.json's fan_in_fan_out, which is only
    a hint (PEFT decides per layer); bound to a base (lorasurgery.binding), a `laid_out` copy has the
    layout the model's structure decides. The module itself is never changed."""

    name: str  # module path, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear" | "embedding" | "conv" | "parameter" (target_parameters, stored (out, in) or 3-D)
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
    parameter: str = "weight"  # the base tensor's leaf: weight, in_proj_weight (MHA), a targeted parameter
    experts: int = 0  # > 0: LoRA on a 3-D expert parameter (experts, …), r per expert (kind "parameter")
    transposed: bool = False  # experts stored (E, in, out) (transformers' is_transposed), else (E, out, in)
    candidates: tuple[str, ...] = ()  # target_parameters of this module not yet told apart (see bind)
    depth: int = 0  # how deep PEFT nested this parameter's wrapper (`<m>.base_layer.….lora_A`)
    piece: tuple[int, int, int, int] | None = None  # (expert, of experts, first row, end row): one expert's
    # rows of a fused parameter that the checkpoint stores split (see adapter/parameters.py)
    slot: object = None  # a per-expert linear module bound to its slice of a fused expert parameter the
    # checkpoint stores whole: a model.ExpertSlice (lorasurgery.binding sets it; linalg/update.py merges into it)

    def laid_out(self, fan_in_fan_out: bool) -> LoraModule:
        """This module with its base weight stored (in, out) when `fan_in_fan_out`, else (out, in)."""
        if self.kind != "linear":
            return self
        out_features, in_features = self.features
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        return dataclasses.replace(self, fan_in_fan_out=fan_in_fan_out, shape=shape)

    @property
    def features(self) -> tuple[int, int]:
        """(out, in) of a linear module, whatever its layout."""
        return (self.shape[1], self.shape[0]) if self.fan_in_fan_out else (self.shape[0], self.shape[1])

    @property
    def base_weight_name(self) -> str:
        return f"{self.name}.{self.parameter}"

    @property
    def label(self) -> str:
        """How reports name it: its key, or for a LoRA on a parameter not yet told apart from the
        module's other targeted parameters, `<module> (<p1>|<p2>)`."""
        if self.kind == "parameter" and not self.parameter:
            return f"{self.name} ({'|'.join(self.candidates)})"
        return self.key

    @property
    def key(self) -> str:
        """This module's key in Adapter.modules: its path, or for a targeted parameter `<path>.<parameter>`
        (`<path>` plus one `.base_layer` per nesting level while the parameter is not yet known)."""
        if self.kind != "parameter":
            return self.name
        return f"{self.name}.{self.parameter}" if self.parameter else self.name + ".base_layer" * self.depth


@dataclass
class TokenRows:
    """Trainable tokens: rows `indices` of the base's <module>.weight become the saved rows (PEFT's
    TrainableTokensLayer merges with index_copy: an overwrite, not an addition)."""

    module: str  # the embedding's module path
    key: str  # <module>.token_adapter.trainable_tokens_delta, (len(indices), dim)
    indices: list[int]

    @property
    def base_weight_name(self) -> str:
        return f"{self.module}.weight"


@dataclass
class Adapter:
    path: Path  # the adapter folder (or file)
    config: AdapterConfig
    checkpoint: Checkpoint  # the adapter's weight file, header only
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # base-relative name -> adapter key
    tokens: dict[str, TokenRows] = field(default_factory=dict)  # embedding module -> overwritten rows

    @property
    def tensors(self):
        return self.checkpoint.tensors

    @property
    def weights_file(self) -> Path:
        return self.checkpoint.files[0]

    def read(self, key: str, device: str = "cpu"):
        return self.checkpoint.read(key, device)

    def _module(self, module: str | LoraModule) -> LoraModule:
        return self.modules[module] if isinstance(module, str) else module

    def read_factors(self, module: str | LoraModule, device: str = "cpu"):
        """(A, B) as saved: A (r, in) or (r, vocab) or (r, in, *k); B (out, r) or (dim, r) or (out, r, *1).

        `module` is a key of `modules`, or a LoraModule of this adapter (a bound copy, lorasurgery.binding)."""
        lora = self._module(module)
        A, B = self.read(lora.a_key, device), self.read(lora.b_key, device)
        if lora.piece is not None:  # expert e's rows of a fused expert parameter (linalg/delta.py's A_e, B_e)
            e, experts, start, stop = lora.piece
            r = A.shape[0] // experts
            A = A.reshape(experts, r, A.shape[-1])[e]
            B = B.reshape(B.shape[0], r, experts)[start:stop, :, e]
        return A, B

    def expert_factors(self, module: str | LoraModule, device: str = "cpu"):
        """[(A_e (r, in), B_e (out, r)) per expert] of a LoRA on a 3-D expert parameter, else None."""
        lora = self._module(module)
        if lora.kind != "parameter" or lora.piece is not None or lora.experts <= 1:
            return None
        A, B = self.read_factors(lora, device)
        E = lora.experts
        r = A.shape[0] // E
        A3 = A.reshape(E, r, A.shape[-1])  # (E, r, in): expert e's rows e·r … e·r + r − 1
        B3 = B.reshape(B.shape[0], r, E)  # (out, r, E): expert e's columns e, E + e, …
        return [(A3[e], B3[:, :, e]) for e in range(E)]

    def label(self, module: str) -> str:
        """How reports name a module (LoraModule.label)."""
        return self.modules[module].label

    def read_magnitude(self, module: str | LoraModule, device: str = "cpu"):
        key = self._module(module).magnitude_key
        return self.read(key, device) if key else None

    def read_lora_bias(self, module: str | LoraModule, device: str = "cpu"):
        key = self._module(module).bias_key
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
            names = open_checkpoint(path, raw=True).tensors
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
                _refuse_kohya(candidate, open_checkpoint(candidate, raw=True).tensors)
            except CheckpointError:
                pass
        raise AdapterError(f"{path}: no {CONFIG_FILE}; not a PEFT adapter folder")
    try:
        raw = read_json(config_path, CONFIG_FILE)
    except CheckpointError as error:
        raise AdapterError(str(error)) from None
    config = parse_adapter_config(raw, config_path)
    # Raw: a config.json some trainers copy beside an adapter describes its base, not its factors,
    # so only the adapter's own tensors can show quantization (they never should).
    checkpoint = open_checkpoint(_find_weights(path), raw=True)
    _refuse_kohya(checkpoint.files[0], checkpoint.tensors)
    quantized = recognise(None, checkpoint.tensors)
    if quantized is not None:
        raise refusal(quantized, checkpoint.tensors, checkpoint.files[0])
    adapter = Adapter(path=path, config=config, checkpoint=checkpoint)
    _index_tensors(adapter)
    if not adapter.modules and not adapter.replacements and not adapter.tokens:
        raise AdapterError(f"{checkpoint.files[0]}: the adapter holds no LoRA tensors")
    return adapter


def _relative(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def _index_tensors(adapter: Adapter) -> None:
    file = adapter.checkpoint.files[0]
    parts: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}  # base-relative name -> key, from <m>.<p> and <m>.base_layer.<p>
    duplicates: dict[str, str] = {}  # from <m>.modules_to_save.<p>: used only without <m>.<p>
    tokens: dict[str, str] = {}  # embedding module -> its trainable_tokens_delta key
    for key in adapter.tensors:
        relative = _relative(key)
        if ".token_adapter." in relative:
            module, _, rest = relative.partition(".token_adapter.")
            if rest.removesuffix(".default") != "trainable_tokens_delta":
                raise AdapterError(f"{file}: unexpected trainable-token tensor {relative}")
            tokens[module] = key
            continue
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
    adapter.tokens = _token_rows(adapter.config, adapter.tensors, file, tokens)
    for raw, found in parts.items():
        name, depth = _unwrapped(raw)
        parameters = adapter.config.targeted_parameters(name) if depth >= 0 else []
        if parameters:  # PEFT's ParamWrapper: LoRA on an nn.Parameter of `name`
            module = _make_parameter_module(
                adapter.config, adapter.tensors, file, name, found, parameters, depth
            )
            key = module.key
        else:
            # PEFT builds MultiheadAttention's out_proj LoRA with the MHA module's r and alpha
            outer = raw.removesuffix(".base_layer.out_proj") if raw.endswith(".base_layer.out_proj") else name
            module = _make_module(adapter.config, adapter.tensors, file, name, found, pattern_name=outer)
            if f"{raw}.base_layer.out_proj" in parts:  # nn.MultiheadAttention: lora_A/B update in_proj
                module.parameter = "in_proj_weight"
            if raw.endswith(".base_layer.out_proj") and raw.removesuffix(".base_layer.out_proj") in parts:
                # PEFT's MultiheadAttention adds out_proj's ΔW before calling its Linear's own merge,
                # which adds it again: its forward (merged for every call) and its merge_and_unload both
                # see W + 2·s·B@A, so that is what the trained model is.
                module.scale *= 2
            key = name
        if key in adapter.modules:
            raise AdapterError(f"{file}: module {name} is adapted twice ({raw})")
        adapter.modules[key] = module


def _unwrapped(raw: str) -> tuple[str, int]:
    """(module path without PEFT's `base_layer` segments, how many trailed it; -1 when one sat inside
    the path, as in nn.MultiheadAttention's <mha>.base_layer.out_proj)."""
    depth = 0
    while raw.endswith(".base_layer"):
        raw, depth = raw[: -len(".base_layer")], depth + 1
    if ".base_layer." in raw:
        return raw.replace(".base_layer.", "."), -1
    return raw, depth


def _token_rows(
    config: AdapterConfig, tensors: dict, file: Path, tokens: dict[str, str]
) -> dict[str, TokenRows]:
    rows = {}
    for module, key in tokens.items():
        indices = config.token_indices(module, only=len(tokens) == 1)
        if indices is None:
            raise AdapterError(
                f"{file}: {module} has trainable tokens but adapter_config.json's trainable_token_indices "
                f"names no rows for it"
            )
        shape = tuple(tensors[key].shape)
        if len(shape) != 2 or shape[0] != len(indices):
            raise AdapterError(
                f"{file}: module {module}: trainable_tokens_delta has shape {list(shape)} for "
                f"{len(indices)} token indices"
            )
        if len(set(indices)) != len(indices):
            raise AdapterError(f"{file}: module {module}: trainable_token_indices repeats a token")
        rows[module] = TokenRows(module, key, indices)
    return rows


def _make_module(
    config: AdapterConfig,
    tensors: dict,
    file: Path,
    module: str,
    found: dict[str, str],
    pattern_name: str = "",
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
        if len(b_shape) > 2 and len(a_shape) > 2 and r % b_shape[1] == 0:  # lora_B (out, r/groups, 1, …)
            raise UnsupportedError(
                f"{where}: a LoRA on a grouped convolution (groups = {r // b_shape[1]}, lora_B of shape "
                f"{list(b_shape)}); PEFT cannot merge LoRA on a ConvNd with groups > 1 either"
            )
        raise AdapterError(f"{where}: lora_A has rank {r} but lora_B has shape {list(b_shape)}")
    expected_r = config.rank_of(pattern_name or module)
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
        alpha=config.alpha_of(pattern_name or module),
        scale=config.scale_of(pattern_name or module, r),
        fan_in_fan_out=config.fan_in_fan_out and kind == "linear",
        dora=magnitude_key is not None,
        lora_bias=bias_key is not None,
        shape=tuple(shape),
        a_key=a_key,
        b_key=b_key,
        bias_key=bias_key,
        magnitude_key=magnitude_key,
    )


def _make_parameter_module(
    config: AdapterConfig, tensors: dict, file: Path, name: str, found: dict[str, str], candidates, depth: int
) -> LoraModule:
    """A ParamWrapper's LoRA: lora_A (r·E, in), lora_B (out, r·E); which parameter it targets is known
    here only when the module has one target (else `bind_parameter` decides against the base)."""
    where = f"{file}: module {name}"
    a_key, b_key = found.get("lora_A"), found.get("lora_B")
    if not a_key or not b_key:
        raise AdapterError(f"{where}: has no {'lora_A' if not a_key else 'lora_B'} tensor")
    extra = sorted(set(found) - {"lora_A", "lora_B"})
    if extra:  # PEFT refuses DoRA, lora_bias and embeddings on nn.Parameter targets
        raise AdapterError(f"{where}: unexpected {', '.join(extra)} on a target_parameters module")
    a_shape, b_shape = tuple(tensors[a_key].shape), tuple(tensors[b_key].shape)
    if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != a_shape[0] or a_shape[0] == 0:
        raise AdapterError(f"{where}: lora_A {list(a_shape)} and lora_B {list(b_shape)} do not pair up")
    parameter = candidates[0] if len(candidates) == 1 else ""
    ranks = {config.rank_of(f"{name}.{p}") for p in ([parameter] if parameter else candidates)}
    r = ranks.pop() if len(ranks) == 1 else 0
    if r and a_shape[0] % r:
        raise AdapterError(
            f"{where}: lora_A has {a_shape[0]} rows, not a multiple of r = {r} (one block of r per expert)"
        )
    experts = a_shape[0] // r if r else 0
    module = LoraModule(
        name=name,
        kind="parameter",
        r=r,
        alpha=config.alpha_of(f"{name}.{parameter}"),
        scale=config.scale_of(f"{name}.{parameter}", r) if r else 0.0,
        fan_in_fan_out=False,
        dora=False,
        lora_bias=False,
        shape=(b_shape[0], a_shape[1]) if experts == 1 else (),
        a_key=a_key,
        b_key=b_key,
        parameter=parameter,
        experts=experts,
        candidates=tuple(candidates),
        depth=depth,
    )
    return module

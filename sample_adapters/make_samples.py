"""Make the shipped samples: a tiny real Llama, a full fine-tune of it, and three real PEFT adapters.

Run: python sample_adapters/make_samples.py [OUTDIR] [--threads N]   (default: this folder, one thread;
about a minute)
     python sample_adapters/make_samples.py --check OUTDIR [--threads N]   (a few seconds)

Everything is trained on real English text, bytes as tokens (vocabulary 256, no tokenizer needed):
the base on the GNU GPL v3, the fine-tunes on the Apache License 2.0 (both verbatim in corpus/,
copied from Debian's /usr/share/common-licenses; verbatim copies may be redistributed). Seeded and
deterministic on one machine, but not across machines: another CPU draws the float32 initialisation
and rounds sums differently, and 300 AdamW steps amplify that to a few percent of every weight.

So the recipe is checked in two ways. --check trains the same recipe for CHECK_STEPS steps per
model in float64 and prints its losses and per-tensor sums and norms, which tests/test_samples.py
compares with regeneration_check.json: bit-identical across the CPU kernels measured, moved by any
real change of the recipe (README.md). check_full_regeneration.py, for maintainers, regenerates in
full and compares what survives 300 steps of rounding: structure, training curves, held-out losses.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SEQ, BATCH = 64, 16
FOLDERS = ["base", "lora_qv_r8", "rslora_all_r16", "dora_qv_r8", "finetuned"]
CHECK_STEPS = 5  # per model in --check: few enough that float64 rounding cannot grow, enough to train B


def batches(text: str, count: int, seed: int):
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    windows = data[: (len(data) // SEQ) * SEQ].reshape(-1, SEQ)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield windows[torch.randint(0, len(windows), (BATCH,), generator=generator)]


def next_token_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss, in the model's own precision.

    float32 (the shipped recipe) asks transformers for it; its loss upcasts the logits with .float(),
    which would round a float64 check's logits to float32, so in float64 the same mean cross-entropy
    of each byte given the ones before it is computed here."""
    if next(model.parameters()).dtype == torch.float32:
        return model(batch, labels=batch).loss
    logits = model(batch).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())


def train(model, text: str, steps: int, lr: float, seed: int) -> list[float]:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for batch in batches(text, steps, seed):
        loss = next_token_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def make(
    out: Path, threads: int = 1, steps: int | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, list[float]]:
    """Train and save the samples under `out`; return each model's per-step training losses.

    steps=None, float32: the shipped recipe (base 300 steps, each fine-tune 80). The check
    (`--check`) runs the same recipe (configs, seeds, data, learning rates, targets, PEFT calls)
    for `steps` steps per model in `dtype`, and saves in float32 like the shipped samples. Weights
    are drawn in `dtype` too: torch's float32 normal_ has vectorised kernels (AVX2, AVX-512) whose
    draws differ by an ulp from the portable one, and Adam's first, sign-like steps turn such an
    ulp into a full learning-rate step on small gradient entries; float64 draws are the same on
    every CPU."""
    import transformers

    transformers.logging.disable_progress_bar()  # "Writing model shards" on stderr
    with _default_dtype(dtype):
        return _make(out, threads, steps, dtype)


def _make(out: Path, threads: int, steps: int | None, dtype: torch.dtype) -> dict[str, list[float]]:
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    base_text = (HERE / "corpus" / "GPL-3").read_text(encoding="utf-8")
    tune_text = (HERE / "corpus" / "Apache-2.0").read_text(encoding="utf-8")
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    pretrain, tune = (300, 80) if steps is None else (steps, steps)
    losses = {}
    base = LlamaForCausalLM(config)
    losses["base"] = train(base, base_text, steps=pretrain, lr=3e-3, seed=1)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    _save_float32(base, out / "base", dtype)
    _byte_tokens(out / "base")

    adapters = {
        "lora_qv_r8": dict(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16),
        "rslora_all_r16": dict(
            target_modules="all-linear",
            r=16,
            lora_alpha=16,
            use_rslora=True,
            rank_pattern={"down_proj": 4},
            alpha_pattern={"down_proj": 8},
        ),
        "dora_qv_r8": dict(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, use_dora=True),
    }
    for seed, (name, lora) in enumerate(adapters.items(), start=2):
        base.load_state_dict(state)
        torch.manual_seed(seed)
        model = peft.get_peft_model(base, peft.LoraConfig(**lora))
        losses[name] = train(model, tune_text, steps=tune, lr=1e-2, seed=seed)
        _save_float32(model, out / name, dtype)
        _relative_base(out / name)
        base = model.unload()

    base.load_state_dict(state)
    base.requires_grad_(True)  # PEFT froze the base; a full fine-tune trains every weight
    losses["finetuned"] = train(base, tune_text, steps=tune, lr=1e-3, seed=9)
    _save_float32(base, out / "finetuned", dtype)
    _byte_tokens(out / "finetuned")
    return losses


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _save_float32(model, folder: Path, dtype: torch.dtype) -> None:
    """Save in float32 like the shipped samples, then return to `dtype` (both no-ops in float32).

    In float64 the model keeps only float32 digits afterwards; that is harmless because every later
    use starts with load_state_dict(state), the float64 base."""
    model.to(torch.float32).save_pretrained(folder)
    model.to(dtype)


def weights_of(folder: Path) -> Path:
    adapter = (folder / "adapter_config.json").exists()
    return folder / ("adapter_model.safetensors" if adapter else "model.safetensors")


def check(out: Path, threads: int = 1) -> dict:
    """The recipe's fingerprint: CHECK_STEPS steps per model in float64, saved under `out` in float32.

    Returns {"steps", "losses": {model: per-step losses}, "tensors": {model: {tensor: [sum, norm]}}}
    (float64 sum and 2-norm of each saved float32 tensor), what sample_adapters/regeneration_check.json
    records and tests/test_samples.py compares."""
    from safetensors.torch import load_file

    losses = make(out, threads, steps=CHECK_STEPS, dtype=torch.float64)
    tensors = {}
    for name in FOLDERS:
        saved = load_file(weights_of(out / name))
        tensors[name] = {
            key: [value.double().sum().item(), value.double().norm().item()]
            for key, value in sorted(saved.items())
        }
    return {"steps": CHECK_STEPS, "losses": losses, "tensors": tensors}


VERSION_STAMPS = {"transformers_version", "peft_version"}  # which library wrote it, not the recipe


def structure_differences(shipped: Path, fresh: Path) -> list[str]:
    """What differs between two sets of samples besides the weights' values: each folder's files,
    tensor names, dtypes and shapes, and its JSON configs. Configs compare without the libraries'
    version stamps and without unset (null, false, empty) entries, which a newer PEFT or transformers
    adds for options it gained; `target_modules` compares as a set (PEFT writes a set, in hash order)."""
    problems = []
    for name in FOLDERS:
        files, fresh_files = ({p.name for p in (root / name).iterdir()} for root in (shipped, fresh))
        if files != fresh_files:
            problems.append(f"{name}: files {sorted(fresh_files)}, shipped {sorted(files)}")
            continue
        ours, theirs = _layout(weights_of(shipped / name)), _layout(weights_of(fresh / name))
        problems += [
            f"{name}: {key} is {theirs.get(key, 'missing')}, shipped {ours.get(key, 'missing')}"
            for key in sorted(ours.keys() | theirs.keys())
            if ours.get(key) != theirs.get(key)
        ]
        for config in sorted(f for f in files if f.endswith("config.json")):
            ours, theirs = (_normalized_config(root / name / config) for root in (shipped, fresh))
            problems += [
                f"{name}/{config}: {key} is {theirs.get(key)!r}, shipped {ours.get(key)!r}"
                for key in sorted(ours.keys() | theirs.keys())
                if ours.get(key) != theirs.get(key)
            ]
    return problems


def _layout(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Each tensor's dtype and shape, from the safetensors header."""
    from safetensors import safe_open

    with safe_open(path, "pt") as weights:
        return {
            k: (weights.get_slice(k).get_dtype(), weights.get_slice(k).get_shape()) for k in weights.keys()
        }


def _normalized_config(path: Path) -> dict:
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return {k: v for k, v in config.items() if k not in VERSION_STAMPS and not _unset(v)}


def _unset(value) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list)) and not value)


def _byte_tokens(model_folder: Path) -> None:
    """Declare that this model's tokens are UTF-8 bytes (no tokenizer files): see lorasurgery/textdata.py."""
    (model_folder / "byte_tokens.json").write_text(json.dumps({"byte_tokens": True}) + "\n")


def _relative_base(adapter: Path) -> None:
    """Name the base as a path a user of this repository can load: sample_adapters/base."""
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = "sample_adapters/base"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (adapter / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template


if __name__ == "__main__":
    args = sys.argv[1:]
    threads = 1
    if "--threads" in args:
        at = args.index("--threads")
        threads = int(args[at + 1])
        del args[at : at + 2]
    if "--check" in args:
        args.remove("--check")
        if len(args) != 1:
            sys.exit("usage: make_samples.py --check OUTDIR [--threads N]")
        print(json.dumps(check(Path(args[0]), threads), indent=1))
        sys.exit()
    target = Path(args[0]) if args else HERE
    for name, curve in make(target, threads).items():
        print(f"{name}: loss {curve[0]:.3f} -> {sum(curve[-10:]) / 10:.3f} over {len(curve)} steps")

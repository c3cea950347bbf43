"""Make the shipped samples: a tiny real Llama, a full fine-tune of it, and three real PEFT adapters.

Run: python sample_adapters/make_samples.py [OUTDIR] [--threads N]   (default: this folder, one thread;
about half a minute)

Everything is trained on real English text, bytes as tokens (vocabulary 256, no tokenizer needed):
the base on the GNU GPL v3, the fine-tunes on the Apache License 2.0 (both verbatim in corpus/,
copied from Debian's /usr/share/common-licenses; verbatim copies may be redistributed). Seeded and
deterministic on one machine; another CPU's BLAS (or another thread count, which changes the order of
reductions the same way) rounds differently, and 300 AdamW steps amplify that rounding, so
tests/test_samples.py compares a regeneration by what is stable across machines, not bit for bit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SEQ, BATCH = 64, 16


def batches(text: str, count: int, seed: int):
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    windows = data[: (len(data) // SEQ) * SEQ].reshape(-1, SEQ)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield windows[torch.randint(0, len(windows), (BATCH,), generator=generator)]


def train(model, text: str, steps: int, lr: float, seed: int) -> list[float]:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for batch in batches(text, steps, seed):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def make(out: Path, threads: int = 1) -> dict[str, list[float]]:
    import peft
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.logging.disable_progress_bar()  # "Writing model shards" on stderr
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
    losses = {}
    base = LlamaForCausalLM(config)
    losses["base"] = train(base, base_text, steps=300, lr=3e-3, seed=1)
    base.save_pretrained(out / "base")
    _byte_tokens(out / "base")
    state = {k: v.clone() for k, v in base.state_dict().items()}

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
        losses[name] = train(model, tune_text, steps=80, lr=1e-2, seed=seed)
        model.save_pretrained(out / name)
        _relative_base(out / name)
        base = model.unload()

    base.load_state_dict(state)
    base.requires_grad_(True)  # PEFT froze the base; a full fine-tune trains every weight
    losses["finetuned"] = train(base, tune_text, steps=80, lr=1e-3, seed=9)
    base.save_pretrained(out / "finetuned")
    _byte_tokens(out / "finetuned")
    return losses


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
    target = Path(args[0]) if args else HERE
    for name, curve in make(target, threads).items():
        print(f"{name}: loss {curve[0]:.3f} -> {sum(curve[-10:]) / 10:.3f} over {len(curve)} steps")

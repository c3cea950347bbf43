"""Shared fixtures: tiny real bases and PEFT-made adapters (session-scoped, built on first use)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from factories import ...` from any test

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from factories import make_adapter, make_bert, make_gpt2, make_llama, silence_libraries  # noqa: E402

silence_libraries()


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    """Tiny Llama (vocab 128, hidden 32, 2 layers, GQA 4/2), fp32, one model.safetensors."""
    return make_llama(tmp_path_factory.mktemp("llama_base"))


@pytest.fixture(scope="session")
def llama_base_sharded(tmp_path_factory) -> Path:
    """The same weights as `llama_base`, saved in 20 KB shards with model.safetensors.index.json."""
    return make_llama(tmp_path_factory.mktemp("llama_base_sharded"), max_shard_size="20KB")


@pytest.fixture(scope="session")
def llama_base_tied(tmp_path_factory) -> Path:
    """Tiny Llama with lm_head tied to embed_tokens (no lm_head.weight in the file)."""
    return make_llama(tmp_path_factory.mktemp("llama_base_tied"), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory) -> Path:
    """Tiny GPT-2 (Conv1D layers, lm_head tied to wte)."""
    return make_gpt2(tmp_path_factory.mktemp("gpt2_base"))


@pytest.fixture(scope="session")
def bert_base(tmp_path_factory) -> Path:
    """Tiny BertModel (tensors without a prefix)."""
    return make_bert(tmp_path_factory.mktemp("bert_base"))


@pytest.fixture(scope="session")
def bert_cls_base(tmp_path_factory) -> Path:
    """Tiny BertForSequenceClassification (tensors under `bert.`, plus `classifier`)."""
    return make_bert(tmp_path_factory.mktemp("bert_cls_base"), head=True)


@pytest.fixture(scope="session")
def llama_lora_qv(llama_base, tmp_path_factory) -> Path:
    """LoRA r=4, alpha=8 on q_proj/v_proj of `llama_base`."""
    return make_adapter(
        llama_base,
        tmp_path_factory.mktemp("llama_lora_qv"),
        target_modules=["q_proj", "v_proj"],
        r=4,
        lora_alpha=8,
    )


@pytest.fixture(scope="session")
def llama_dora(llama_base, tmp_path_factory) -> Path:
    """DoRA r=4, alpha=8 on q_proj/v_proj of `llama_base` (magnitudes perturbed)."""
    return make_adapter(
        llama_base,
        tmp_path_factory.mktemp("llama_dora"),
        target_modules=["q_proj", "v_proj"],
        r=4,
        lora_alpha=8,
        use_dora=True,
        seed=1,
    )


@pytest.fixture(scope="session")
def gpt2_lora(gpt2_base, tmp_path_factory) -> Path:
    """LoRA r=4 on GPT-2's Conv1D c_attn and c_fc (fan_in_fan_out=True)."""
    return make_adapter(
        gpt2_base,
        tmp_path_factory.mktemp("gpt2_lora"),
        model_kind="gpt2",
        target_modules=["c_attn", "c_fc"],
        r=4,
        lora_alpha=8,
        fan_in_fan_out=True,
        seed=2,
    )

"""Tiny real transformers models (in memory) and PEFT-made fine-tunes/adapters for tests (seeded, < 1 s
each); adapters are randomised by factories.randomize_adapter, the tests' one randomiser."""

from __future__ import annotations

import peft
import torch
import transformers
from factories import randomize_adapter


def tiny_llama(tie: bool = False, vocab: int = 64, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def peft_finetune(model, seed: int = 1, **lora):
    """A fine-tune whose ΔW is exactly low rank: a randomized PEFT adapter, merged by PEFT."""
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**lora))
    randomize_adapter(wrapped, seed=seed, std=0.1)
    return wrapped.merge_and_unload()


def peft_adapter(model, out, seed: int = 1, **lora):
    """A real PEFT adapter saved to `out`, with every zero-initialised factor randomized so ΔW ≠ 0."""
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**lora))
    randomize_adapter(wrapped, seed=seed, std=0.1)  # the one randomiser (factories)
    wrapped.save_pretrained(out)
    return wrapped


def tiny_bert(head: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = transformers.BertForSequenceClassification(config) if head else transformers.BertModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name:  # not all ones/zeros: merges must be checked on real values
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model

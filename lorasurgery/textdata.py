"""Token windows of a user's text (`--text FILE`) for the commands that run a forward pass.

The tokenizer is the checkpoint folder's own (AutoTokenizer, local files only: nothing is
downloaded). A folder without tokenizer files is refused, unless it declares that its tokens are
the text's UTF-8 bytes with a `byte_tokens.json` file (`{"byte_tokens": true}`), as this
repository's sample models do (vocabulary 256, no tokenizer). See docs/rank-report.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorasurgery.errors import LoraSurgeryError

DEFAULT_TOKENS = 2048
MAX_WINDOW = 512  # tokens per sequence: attention cost stays linear-ish in --tokens
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
BYTE_TOKENS_FILE = "byte_tokens.json"


def byte_tokens(folder: Path) -> bool:
    marker = folder / BYTE_TOKENS_FILE
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text(encoding="utf-8")).get("byte_tokens"))
    except (ValueError, AttributeError) as error:
        raise LoraSurgeryError(f'{marker}: not a JSON object with "byte_tokens" ({error})') from None


def token_ids(
    folder: str | os.PathLike, text_file: str | os.PathLike, tokens: int = DEFAULT_TOKENS
) -> list[int]:
    """The first `tokens` token ids of `text_file`, tokenised as the model in `folder` expects."""
    folder, text_file = Path(folder), Path(text_file)
    if not text_file.is_file():
        raise LoraSurgeryError(f"--text {text_file}: no such file")
    text = text_file.read_text(encoding="utf-8", errors="replace")
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise LoraSurgeryError(f"{folder}: its tokenizer files could not be loaded ({error})") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif byte_tokens(folder):
        ids = list(text.encode("utf-8"))
    else:
        raise LoraSurgeryError(
            f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) to tokenise --text with; save the "
            f"model's tokenizer into the folder (tokenizer.save_pretrained), or, if its tokens are bytes, "
            f'add {BYTE_TOKENS_FILE} with {{"byte_tokens": true}}'
        )
    ids = ids[:tokens]
    if len(ids) < 2:
        raise LoraSurgeryError(f"--text {text_file}: fewer than 2 tokens, nothing to predict")
    return ids


def token_windows(ids: list[int], config, source: str):
    """[(1, L) LongTensor, …]: consecutive windows of at most min(MAX_WINDOW, max_position_embeddings)
    tokens for the model of `config`; LoraSurgeryError naming `source` (the text and the tokenizer's
    folder) when an id lies outside the model's vocabulary (a tokenizer, or byte tokens, that are not
    this model's): the embedding lookup would fail with an IndexError."""
    import torch

    vocabulary, largest = getattr(config, "vocab_size", None), max(ids)
    if vocabulary and largest >= vocabulary:
        raise LoraSurgeryError(
            f"{source}: token id {largest} is outside the model's vocabulary ({vocabulary} entries): the "
            f"tokenizer (or {BYTE_TOKENS_FILE}'s byte ids 0–255) is not this model's"
        )
    length = min(MAX_WINDOW, getattr(config, "max_position_embeddings", None) or MAX_WINDOW)
    ids_tensor = torch.tensor(ids, dtype=torch.long)
    windows = [ids_tensor[i : i + length] for i in range(0, len(ids), length)]
    return [w[None, :] for w in windows if len(w) >= 2]

"""verify of a merged checkpoint's config.json: what it says must agree with what its tensors need.

- ties: the word embeddings are tied in the artifact exactly when the tie rule (lorasurgery.recipes)
  keeps them tied; a tie the adapters break but the config keeps makes transformers load one member
  in place of the other;
- vocabulary: vocab_size equals the rows of the input (and output) embedding the artifact stores;
- quantization: a quantization_config is declared exactly when quantized tensors are stored.
"""

from __future__ import annotations


def check_config(base, structure, artifact, artifact_structure, recipes) -> list[str]:
    """Inconsistencies, each a sentence naming config.json and the key; [] when none."""
    issues: list[str] = []
    config = artifact.config
    if config is None:
        return issues
    where = f"{artifact.path}: config.json"
    word = {f"{m}.weight" for m in (structure.input_embedding, structure.output_embedding) if m}
    untied = any(outcome.untied and word & set(outcome.group) for outcome in recipes.ties)
    kept = any(word <= set(group) for group in structure.tied)
    expected = False if untied else kept
    ties = artifact_structure.word_embeddings_tied()
    if word and len(word) == 2 and ties != expected:
        why = (
            "the adapters change one side of the tie"
            if untied
            else "the base ties them and nothing changes one side"
        )
        issues.append(
            f"{where}: the word embeddings are {'tied' if ties else 'untied'}, expected {'tied' if expected else 'untied'} ({why})"
        )
    embedding = f"{artifact_structure.input_embedding}.weight" if artifact_structure.input_embedding else None
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if embedding in artifact.tensors and isinstance(vocab, int):
        rows = artifact.tensors[embedding].shape[0]
        if rows != vocab:
            issues.append(f"{where}: vocab_size is {vocab} but {embedding} has {rows} rows")
    declared = "quantization_config" in config or "compression_config" in config
    quantized = artifact.quantization is not None and any(i.dequantized for i in artifact.tensors.values())
    if declared and not quantized:
        issues.append(f"{where}: declares quantization_config but no tensor is stored quantized")
    if quantized and not declared:
        issues.append(
            f"{where}: quantized tensors are stored but config.json declares no quantization_config"
        )
    return issues

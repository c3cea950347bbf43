"""`export`: an adapter rewritten for a serving runtime (export.py), by the runtime's rules (lorasurgery/targets.py),
as a PEFT folder or a llama.cpp GGUF (gguf.py). See docs/export.md."""

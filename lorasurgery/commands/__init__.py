"""One package (or module) per command, over the shared layers; no command imports another.

inspect.py, merge/, extract/, rank_report/, surgery/ (resize and combine), export/: each returns plain
dataclasses and never prints (docs/architecture.md; tests/test_imports.py enforces the rule).
"""

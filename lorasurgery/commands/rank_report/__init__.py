"""`rank-report`: spectra of a model's weights, of a fine-tune's ΔW or of an adapter (rank_report.py),
with --probe the functional rank from forward passes (probe.py); targets.py says what is analysed."""

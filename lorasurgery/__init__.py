"""lorasurgery: model surgery and analysis of LoRA adapters.

The library core (io, adapter, linalg, commands) never prints and never imports click or rich;
the command line lives in the cli/ package. Importing this package does not import torch.
"""

__version__ = "0.1.0"

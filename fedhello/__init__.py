"""fedhello: fused multi-client LoRA kernels and heterogeneous-LoRA federated learning (Fed-HeLLo)."""

__version__ = "0.1.0"

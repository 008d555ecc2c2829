"""fedhello: fused multi-client LoRA kernels and heterogeneous-LoRA federated learning (Fed-HeLLo)."""

from fedhello.quantization import quiet_bitsandbytes

__version__ = "0.1.0"

quiet_bitsandbytes()

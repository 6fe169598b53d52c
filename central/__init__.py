"""Central engine: the full (MoE) model on PyTorch + transformers, DeepSpeed tensor parallel."""

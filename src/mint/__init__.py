"""mint: LoRA post-training and serving over resident base models."""

__version__ = "0.1.0"

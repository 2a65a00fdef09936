"""FURINA: router-free mixture of LoRA experts that folds exactly into the base weights."""

__version__ = "0.1.0"

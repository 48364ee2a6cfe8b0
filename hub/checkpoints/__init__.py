"""Adapted checkpoints dida-timm publishes, one Hugging Face repo folder each (installed as dida_timm.checkpoints)."""

"""Data: the synthetic dataset, LLaVA-format loading, image preprocessing and collation."""

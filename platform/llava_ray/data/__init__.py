"""Data: LLaVA-format sources, per-sample checks and tokenisation, image preprocessing, the Ray Data
prepare job and its report, the prepared-data reader, and the synthetic dataset. Torch-free."""

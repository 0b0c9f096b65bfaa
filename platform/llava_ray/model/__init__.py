"""The LLaVA model: presets, tokenizer, conversation templates, projector, export."""

"""The LLaVA model, one module per job: :mod:`.llava` (the module), :mod:`.loss`, :mod:`.weights` (file
format), :mod:`.build` (from a config), :mod:`.presets` (building a preset's parts), :mod:`.projector`,
:mod:`.generate` and :mod:`.export` (Hugging Face ``LlavaForConditionalGeneration``)."""

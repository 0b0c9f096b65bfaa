"""Stage training on Ray Train + DeepSpeed.

:mod:`.driver` runs on the Ray driver (validate, schedule, read the data once, start the
TorchTrainer); :mod:`.worker` is the per-worker loop (setup -> train -> save). Around them:
:mod:`.schedule` (LLaVA-1.5's modality/length-grouped global batches), :mod:`.collate` and
:mod:`.packing` (micro-batches), :mod:`.step` (one optimizer step, also without Ray),
:mod:`.optim` (optimizer groups, schedule, DeepSpeed config), :mod:`.trainable` (what trains),
:mod:`.validation`, :mod:`.metrics`, :mod:`.final_model` and :mod:`.faults` (fault rehearsal).
"""

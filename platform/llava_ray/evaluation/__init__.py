"""Evaluation of trained models: benchmarks scored from batched generation on Ray actors, and a chat.

``llava-ray evaluate --config FILE`` runs :func:`llava_ray.evaluation.job.run_evaluate` on the config's
``evaluate`` section; ``llava-ray chat --model DIR`` runs :func:`llava_ray.evaluation.chat.chat_main`.
The pieces: :mod:`.items` (the evaluation format), :mod:`.loaded_model` (a model with its template,
images as the tower sees them), :mod:`.batch_generate` (batched generation, in process or on a Ray
Data actor pool), the benchmarks :mod:`.synthetic`, :mod:`.scienceqa` and :mod:`.judge` (LLaVA-Bench
with an LLM judge; its official layouts in :mod:`.llava_bench`, and ``llava-ray reference-answers``,
the text-only LLM's reference answers, in :mod:`.llava_bench_reference`), :mod:`.job` (the evaluate
job) and :mod:`.chat`.
"""

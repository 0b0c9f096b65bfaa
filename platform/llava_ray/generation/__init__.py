"""Instruction-data generation, LLaVA's key idea: a text-only LLM writes conversations about images
it never sees, from their captions and object boxes.

``llava-ray generate-data --config FILE`` runs :func:`llava_ray.generation.job.run_generate` on the
config's ``generate`` section; the output is a LLaVA JSON array that ``llava-ray prepare`` reads
unchanged. The pieces, in data order: :mod:`.mix` (which response types each image gets),
:mod:`.context` (annotations -> symbolic context), :mod:`.prompting` (prompt files -> messages),
:mod:`.workers` (the LLM backends on Ray actors, over :mod:`llava_ray.endpoints`), :mod:`.parse`
(replies -> samples), :mod:`.job` (the job).
"""

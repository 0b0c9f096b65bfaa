"""End-to-end workflows built from the stage jobs: the pipeline, Ray Tune sweeps and the demo."""

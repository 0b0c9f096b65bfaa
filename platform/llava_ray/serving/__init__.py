"""Serving a trained model: a Ray Serve app with an OpenAI-compatible API and a web chat page (``llava-ray serve``)."""

"""Clients for OpenAI-compatible LLM endpoints (instruction generation, the evaluation judge) and their resumable journal."""

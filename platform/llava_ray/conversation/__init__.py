"""Conversation templates and tokenizers: how a LLaVA conversation becomes tokens and labels.

Torch-free: data preparation workers import it. Below both ``data`` and ``model``.
"""

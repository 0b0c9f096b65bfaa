"""The evaluation tests' fixtures (synthetic data, a tiny trained model) live in tests/conftest.py:
the serving tests share them."""

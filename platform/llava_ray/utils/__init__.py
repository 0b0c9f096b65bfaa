"""Small shared helpers below every other layer: storage URLs, logging, skips, version shims."""

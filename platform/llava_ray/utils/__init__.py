"""Small shared helpers: storage URLs, ports, processes."""

"""Small shared utilities: logging, atomic file output."""

"""Built-in layer families, one module per family (each registers its types on import)."""

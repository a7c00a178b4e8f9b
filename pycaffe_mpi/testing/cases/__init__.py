"""Layer cases, one module per layer family; importing a module registers its cases."""

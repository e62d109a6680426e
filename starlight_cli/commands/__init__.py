"""One module per ``ctr-starlight`` command (or command group)."""

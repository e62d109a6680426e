"""``python -m starlight_cli`` is ``ctr-starlight``."""

from starlight_cli.main import main

main()

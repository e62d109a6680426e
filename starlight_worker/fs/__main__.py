"""``python -m starlight_worker.fs``: run the layer filesystem server (see ``server``)."""

from starlight_worker.fs.server import main

raise SystemExit(main())

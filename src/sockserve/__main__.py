"""``python -m sockserve``: the same CLI as the ``sockserve`` command."""

from sockserve.cli import main

raise SystemExit(main())

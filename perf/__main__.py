"""``python -m perf``: the latency harness (see perf/README.md and ``--help``)."""

from perf.harness.cli import main

raise SystemExit(main())

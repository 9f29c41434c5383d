"""``python -m perf``: the latency harness (see perf/README.md and ``--help``).

``python -m perf durable ...``: the durable-publish benchmark (perf/durable/).
``python -m perf queue ...``: the durable work-queue benchmark (perf/queue/).
"""

import sys

if sys.argv[1:2] == ["durable"]:
    from perf.durable.cli import main as durable_main

    raise SystemExit(durable_main(sys.argv[2:]))
if sys.argv[1:2] == ["queue"]:
    from perf.queue.cli import main as queue_main

    raise SystemExit(queue_main(sys.argv[2:]))

from perf.harness.cli import main

raise SystemExit(main())

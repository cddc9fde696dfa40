"""``python -m bench``: the benchmark suite (see bench/runner.py)."""

from bench.runner import main

raise SystemExit(main())

"""The KV-policy performance table of the internal-memory issue, as a script.

    .venv/bin/python benchmarks/kv_policies.py                 # 4K, 16K, 32K; every policy
    .venv/bin/python benchmarks/kv_policies.py --contexts 4096 --policies dense,quest

Same as `memfusion bench --suite kv`; writes reports/kv-kv.{md,json,png}.
"""

from __future__ import annotations

import sys

from memfusion.cli import app

if __name__ == "__main__":
    sys.exit(app(["bench", "--suite", "kv", *sys.argv[1:]]))

"""Entry point of a case run in its own process (see ``benchmarks._harness.run_isolated``).

    python -m <this package>._worker package.module:function payload.json result.json

calls ``function(payload) -> dict`` and writes the dict to result.json.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path


def main(argv: list) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    target, payload_path, result_path = argv
    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(json.loads(Path(payload_path).read_text()))
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A pytest plugin (``-p tests.triton_launches``): at the end of the session, write the Triton engine's record
of launched kernels (how many launches, which specialisations) to the file named by ``LSX_TRITON_LAUNCHES``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("LSX_TRITON_LAUNCHES")
    if not path:
        return
    engine = sys.modules.get("lsx.torch._engines.triton")
    record = {"count": 0, "launched": []}
    if engine is not None:
        record["count"] = engine.launch_count()
        record["launched"] = [
            {"name": s.name, "signature": s.signature, "constexprs": s.constexprs, "options": s.options}
            for s in engine.launched()
        ]
    Path(path).write_text(json.dumps(record))

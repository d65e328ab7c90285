"""End to end on the real server with the bundled demo model: ``peftserve demo``.

The good reverse v2 must be promoted and the regressed one rolled back without any manual
step, each decision naming its metric, and no user outside the canary cohort may get a
candidate's answer (the demo checks every candidate response against the router's buckets).
"""

from __future__ import annotations

import io

from peftserve import demo


class _Out(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_demo_promotes_good_and_rolls_back_regressed(monkeypatch):
    out = _Out()
    monkeypatch.setattr("sys.stdout", out)
    assert demo.main(["--timeout", "150"]) == 0, out.getvalue()
    text = out.getvalue()
    assert "=> reverse@v2: promoted (as expected)" in text
    assert "=> reverse@v2-regressed: rolled_back (as expected)" in text
    assert "critical metric(s) probe_accuracy failed" in text  # the history names the metric
    assert "0 of them outside the 10 % cohort" in text
    assert "watch it in a browser: http://127.0.0.1:" in text and "/ui " in text  # the page's address

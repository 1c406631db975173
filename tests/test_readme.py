"""The README's first-contact example runs as shown (in a fresh namespace) and lowers the conv."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_first_contact_example_runs_and_fuses_the_conv() -> None:
    section = README.read_text().split("## First contact", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert "qconv: fired 1x" in printed.getvalue()

"""The README's quickstart runs as written and its certificate is a real guarantee."""

import re
from pathlib import Path

import torch

from lipsort.runtime import num_threads

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_certifies(capsys):
    block = re.search(r"## Quickstart\s+```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md has no python block under '## Quickstart'"
    scope: dict = {}
    with num_threads(torch.get_num_threads()):  # the quickstart's setup() changes the count
        exec(compile(block.group(1), str(README), "exec"), scope)
    out = capsys.readouterr().out
    assert re.search(r"L ≤ \d\.\d{4}, certified at ε=0\.1: \d\.\d\d", out), out
    assert float(scope["L"]) <= 1 + 1e-4  # Björck layers: the bound is ≤ 1 up to rounding
    accuracy = float(re.search(r"ε=0\.1: (\d\.\d\d)", out).group(1))
    assert accuracy > 0.7  # well above the majority class (about 0.51): the ring is learnt

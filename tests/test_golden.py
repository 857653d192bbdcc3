"""nbval over the goldens: exact on the CPU model that wrote them, numbers masked elsewhere."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

import lipsort
from lipsort.book import golden
from lipsort.book import provenance as prov

GOLDEN = Path(lipsort.__file__).resolve().parents[1] / "tests" / "golden"


def write_golden(folder: Path, name: str, source: str, stored: str, cpu: str | None) -> Path:
    """A golden whose one cell prints ``source``'s output but stores ``stored`` as its output."""
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(source, execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stored)]
    nb.cells = [cell]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if cpu is not None:
        nb.metadata["lipsort"] = {"cpu": cpu}
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize(("text", "masked"), [
    ("acc 0.668, L 1.0000008", "acc #, L #"),
    ("<td>-6.248e−09</td><td>97.29</td>", "<td>#</td><td>#</td>"),
    ("eps0.3 at step 12 of 200, A8 e001", "eps0.3 at step # of #, A8 e001"),  # names keep their digits
    ("(0.5) [1e-3] x=-2.", "(#) [#] x=#."),
    ("  0.9   ≥ 0.95  holds", " # ≥ # holds"),  # a text table padded to another width
])
def test_mask_numbers(text, masked):
    assert golden.mask_numbers(text) == masked


def test_split_by_cpu_reads_each_goldens_metadata(tmp_path):
    a = write_golden(tmp_path, "a", "print(1)", "1\n", "CPU A")
    b = write_golden(tmp_path, "b", "print(1)", "1\n", "CPU B")
    c = write_golden(tmp_path, "c", "print(1)", "1\n", None)
    assert golden.split_by_cpu([a, b, c], "CPU A") == ([a], {b: "CPU B", c: None})


def test_numbers_compare_exactly_on_the_goldens_cpu_and_masked_elsewhere(tmp_path, capsys):
    (tmp_path / "sanitize.cfg").write_text((GOLDEN / "sanitize.cfg").read_text())
    here = prov.cpu_name()
    args = [str(tmp_path), "-q", "-p", "no:cacheprovider"]
    # Another CPU's golden: a different number passes, a different word does not.
    write_golden(tmp_path, "number", "print('acc', 0.25 + 0.5)", "acc 0.7501\n", "another CPU")
    assert golden.main(args) == 0
    assert "number.ipynb was written on 'another CPU'" in capsys.readouterr().err
    assert golden.main([*args, "--exact"]) == 1  # --exact refuses to mask
    assert "--exact, but this CPU is" in capsys.readouterr().err
    write_golden(tmp_path, "word", "print('acc', 0.75)", "loss 0.75\n", "another CPU")
    assert golden.main(args) != 0
    (tmp_path / "word.ipynb").unlink()
    # This CPU's golden: the same number passes, a different one fails.
    write_golden(tmp_path, "number", "print('acc', 0.25 + 0.5)", "acc 0.75\n", here)
    assert golden.main(args) == 0
    write_golden(tmp_path, "number", "print('acc', 0.25 + 0.5)", "acc 0.7501\n", here)
    assert golden.main(args) != 0


def test_missing_sanitizers_are_named(tmp_path, capsys):
    write_golden(tmp_path, "a", "print(1)", "1\n", None)
    assert golden.main([str(tmp_path)]) == 2
    assert "sanitize.cfg is missing" in capsys.readouterr().err


def test_committed_goldens_name_their_cpu():
    # Without it every golden would be compared masked, on every machine.
    for path in sorted(GOLDEN.glob("*.ipynb")):
        assert golden.golden_cpu(path), f"{path.name} records no CPU: regenerate it with make golden"

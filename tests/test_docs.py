"""The documentation agrees with the code: docs/algorithms.md's table of algorithms is what the
registry declares (scripts/algorithm_table.py writes it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fl_core.algorithms import FAMILIES, registered_algorithms

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table_script():
    spec = importlib.util.spec_from_file_location(
        "algorithm_table", ROOT / "scripts" / "algorithm_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rendered(table_script) -> str:
    return table_script.render()


def _rows(block: str) -> dict[str, list[str]]:
    """Table rows by algorithm name (the † mark dropped): the cells after the name."""
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if line.startswith("| ") and cells[0] not in ("algorithm", "---"):
            rows[cells[0].removesuffix(" †")] = cells[1:]
    return rows


def test_the_guide_table_is_what_the_registry_declares(table_script, rendered):
    current = table_script.current_block(table_script.DOC.read_text())
    assert current == rendered, (
        "docs/algorithms.md's algorithm table differs from what the registry declares; "
        f"regenerate it with `{table_script.REGENERATE}`:\n" + table_script.diff(current, rendered)
    )


def test_the_table_has_every_algorithm_with_its_declarations(table_script, rendered):
    rows = _rows(rendered)
    algos = registered_algorithms()
    assert set(rows) == set(algos) and "fedktl" in rows  # the entry-point plug-in too
    order = list(FAMILIES)
    assert list(rows) == sorted(rows, key=lambda n: (order.index(algos[n].family), n))
    for name, (family, hetero, shared, persistent, paper) in rows.items():
        algo = algos[name]
        assert (family, hetero) == (algo.family, "yes" if algo.heterogeneous else "no")
        assert paper == algo.paper.replace("|", "\\|")
        # a row without † shows what the client class declares
        if f"| {name} † |" not in rendered:
            assert shared == table_script._selection(algo.client_cls.shared), name
            assert persistent == table_script._selection(algo.client_cls.persistent), name
    assert rows["fedbn"][2] == '`(Select("model", modules=is_batchnorm, invert=True),)`'
    assert rows["fedrep"][2:4] == ['`("model/body",)`', '`("model/head",)`']
    assert rows["scaffold"][2:4] == ['`("model", "c")`', '`("ci",)`']


def test_selections_set_by_hyperparameters_show_the_defaults_and_say_so(rendered):
    marked = {line.split(" | ")[0].strip("| ") for line in rendered.splitlines() if " † |" in line}
    assert marked == {"fedkd †", "fedktl †"}
    rows = _rows(rendered)
    # FedKD's default (compressed updates) keeps the mentee; compress=weights does not
    assert rows["fedkd"][3] == '`("model", "w_h", "mentee")`'
    assert '- fedkd: with `algorithm.compress=weights`, `persistent` is `("model", "w_h")`.' in (
        rendered
    )
    assert "- fedktl: with `algorithm.reset_projection=true`" in rendered
    assert "the row shows the defaults'" in rendered


def test_check_mode_reports_a_stale_table_and_writing_fixes_it(
    table_script, rendered, tmp_path, monkeypatch, capsys
):
    doc = tmp_path / "algorithms.md"
    stale = rendered.replace(next(ln for ln in rendered.splitlines() if "| fedprox |" in ln), "")
    doc.write_text(f"# guide\n\n{stale}\n\nafter the table\n")
    monkeypatch.setattr(table_script, "DOC", doc)
    monkeypatch.setattr(table_script, "render", lambda: rendered)
    assert table_script.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "+| fedprox |" in out and "python3 scripts/algorithm_table.py" in out
    assert table_script.main([]) == 0
    assert doc.read_text() == f"# guide\n\n{rendered}\n\nafter the table\n"
    assert table_script.main(["--check"]) == 0

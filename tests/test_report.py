"""Model-selection rules, aggregation, reference numbers and the report files, on synthetic runs."""

from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tllab import launch, report
from tllab.report.references import load_references
from tllab.report.render import cell_text
from tllab.report.runs import find_runs, label_variants
from tllab.report.selection import SELECTION_RULES
from tllab.report.tables import Cell, build_tables
from tllab.train import resolve_config

from .conftest import TESTS, compose_config

GOLDEN = TESTS / "golden" / "synthetic_report.md"

RECORDS = [  # step, source_val/acc, target_test/acc: best source_val at step 2, best target_test at step 3
    {"step": 1, "source_val/acc": 0.50, "target_test/acc": 0.30},
    {"step": 2, "source_val/acc": 0.90, "target_test/acc": 0.40},
    {"step": 3, "source_val/acc": 0.80, "target_test/acc": 0.60},
    {"step": 4, "source_val/acc": 0.90, "target_test/acc": 0.50},
]


def test_selection_rules_pick_the_documented_record():
    rules = SELECTION_RULES
    assert rules["last"].select(RECORDS)["step"] == 4
    assert rules["source_val"].select(RECORDS)["step"] == 2  # ties: the earliest maximum
    assert rules["oracle"].select(RECORDS)["step"] == 3
    assert rules["target_val"].select(RECORDS) is None and not rules["target_val"].applies(RECORDS)
    assert all(rule.select([]) is None for rule in rules.values())
    assert "oracle" in rules["oracle"].title


def _write_run(root: Path, name: str, overrides: list[str], scale: float, state: str = "done") -> None:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg = compose_config(overrides)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))
    if state == "failed":
        (run_dir / "error.txt").write_text("NonFiniteLossError: loss is nan at step 3\n")
        return
    lines = [{**r, "target_test/acc": r["target_test/acc"] * scale} for r in RECORDS]
    (run_dir / "results.jsonl").write_text("".join(f"{json.dumps(r)}\n" for r in lines))
    if state == "done":
        (run_dir / "done").write_text("")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Source only on two tasks x 2 seeds; two learning rates of a second 'method' (a label)
    on one task, one of its runs failed and one unfinished."""
    root = tmp_path_factory.mktemp("runs")
    for seed, scale in [(0, 1.0), (1, 0.5)]:
        for target, factor in [("mnistm", 1.0), ("uci", 1.5)]:
            _write_run(root, f"so_{target}_{seed}", [f"seed={seed}", f"dataset.target=[{target}]"], scale * factor)
    _write_run(root, "m_lr1", ["label=mine", "optim.lr=0.001", "seed=0"], 1.2)
    _write_run(root, "m_lr1_s1", ["label=mine", "optim.lr=0.001", "seed=1"], 1.0, state="failed")
    _write_run(root, "m_lr2", ["label=mine", "optim.lr=0.01", "seed=0"], 0.9)
    _write_run(root, "m_lr2_s1", ["label=mine", "optim.lr=0.01", "seed=1"], 1.0, state="incomplete")
    return root


def test_cells_aggregate_selected_records_over_seeds(runs_dir: Path):
    runs, pending = find_runs([runs_dir])
    label_variants(runs)
    assert pending == [] and len(runs) == 8
    methods = {r.keys["method"] for r in runs}
    assert methods == {"source only", "mine (optim.lr=0.001)", "mine (optim.lr=0.01)"}
    tables = {t.rule.name: t for t in build_tables(runs, list(SELECTION_RULES.values()), "target_test/acc", [])}
    assert set(tables) == {"last", "source_val", "oracle"}  # no run evaluates target_val
    cell = tables["last"].cells[("source only", "mnist→mnistm")]
    assert cell.values == {0: 50.0, 1: 25.0}
    assert cell.mean == 37.5 and cell.std == pytest.approx(math.sqrt(2 * 12.5**2)) and cell.n == 2
    assert cell.sem == pytest.approx(cell.std / math.sqrt(2))
    assert tables["source_val"].cells[("source only", "mnist→mnistm")].values == {0: 40.0, 1: 20.0}
    assert tables["oracle"].cells[("source only", "mnist→uci")].values == pytest.approx({0: 90.0, 1: 45.0})
    failed = tables["last"].cells[("mine (optim.lr=0.001)", "mnist→mnistm")]
    assert (failed.values, failed.failed, failed.incomplete) == ({0: 60.0}, 1, 0)
    unfinished = tables["last"].cells[("mine (optim.lr=0.01)", "mnist→mnistm")]
    assert (unfinished.n, unfinished.incomplete) == (1, 1)
    avg = tables["last"].average("source only")  # per seed: mean over the two tasks
    assert avg.values == {0: 62.5, 1: 31.25}
    assert tables["last"].average("mine (optim.lr=0.01)") is None  # no result on uci


def test_cell_text_never_shows_unfinished_runs_as_numbers():
    assert cell_text(None) == "—"
    assert cell_text(Cell(failed=2)) == "2 failed"
    assert cell_text(Cell(failed=1, incomplete=1)) == "1 failed, 1 incomplete"
    assert cell_text(Cell({0: 40.0, 1: 50.0}, failed=1)) == "45.0 ± 7.1 (2/3 runs, 1 failed)"
    assert cell_text(Cell({0: 40.0}), ref=34.9) == "40.0 [ref 34.9, Δ +5.1]"


def test_reference_numbers_sit_beside_matching_cells(runs_dir: Path, tmp_path: Path):
    ref_file = tmp_path / "refs.yaml"
    ref_file.write_text("- source: Paper X, Table 1\n  dataset: digits\n  setting: da\n"
                        "  values:\n    source only: {mnist→mnistm: 30.0, mnist→uci: 50.0}\n")
    refs = load_references([ref_file])
    runs, _ = find_runs([runs_dir])
    table = build_tables(runs, [SELECTION_RULES["last"]], "target_test/acc", refs)[0]
    assert table.refs[("source only", "mnist→uci")].source == "Paper X, Table 1"
    report.main([str(runs_dir), "--out", str(tmp_path / "out"), "--selection", "last", "--references", str(ref_file),
                 "--no-plots"])
    rows = list(csv.DictReader((tmp_path / "out" / "cells.csv").open()))
    mnistm = next(r for r in rows if r["method"] == "source only" and r["task"] == "mnist→mnistm")
    assert (float(mnistm["mean"]), float(mnistm["reference"]), float(mnistm["delta"])) == (37.5, 30.0, 7.5)
    avg = next(r for r in rows if r["method"] == "source only" and r["task"] == "Avg")
    assert (float(avg["reference"]), float(avg["delta"])) == (40.0, 6.875)
    assert "[ref 30.0, Δ +7.5]" in (tmp_path / "out" / "report.md").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("- dataset: digits\n")
    with pytest.raises(SystemExit, match="is not a reference file"):
        load_references([bad])


def test_references_of_a_preset_apply_to_its_runs_only_and_caption_their_protocol(runs_dir: Path, tmp_path: Path):
    runs, _ = find_runs([runs_dir])
    experiment = runs[0].keys["experiment"]
    ref_file = tmp_path / "refs.yaml"
    entry = ("- source: Paper X\n  dataset: digits\n  setting: da\n  experiment: {e}\n"
             "  selection: best on the target test split\n  paper: {{source only: 25.0}}\n"
             "  values:\n    source only: {{mnist→mnistm: 30.0}}\n")
    ref_file.write_text(entry.format(e=experiment))
    table = build_tables(runs, [SELECTION_RULES["last"]], "target_test/acc", load_references([ref_file]))[0]
    assert ("source only", "mnist→mnistm") in table.refs
    assert table.refs[("source only", "mnist→mnistm")].caption() == (
        "ref: Paper X; selection: best on the target test split; original papers' average: source only 25.0.")
    ref_file.write_text(entry.format(e="table_office31_da"))  # another preset's numbers
    table = build_tables(runs, [SELECTION_RULES["last"]], "target_test/acc", load_references([ref_file]))[0]
    assert not table.refs


def test_builtin_references_load():
    refs = load_references()
    da = next(r for r in refs if r.dataset == "digits" and r.setting == "da")
    assert da.values[("source only", "mnist→mnistm")] == 34.9 and da.values[("adabn", "mnist→mnistm")] == 54.3


def test_report_files_match_the_golden_report(runs_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    report.main([str(runs_dir), "--out", str(out), "--references"])
    text = (out / "report.md").read_text().replace(str(runs_dir), "<runs>")
    if not GOLDEN.exists():  # first run writes the golden file, to be reviewed and committed
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    wide = list(csv.reader((out / "digits_da_last.csv").open()))
    assert wide[0] == ["method", "mnist→mnistm", "mnist→uci", "Avg"]
    assert wide[1][:2] == ["source only", "37.5 ± 17.7"]
    tex = (out / "digits_da_oracle.tex").read_text()
    assert r"mnist$\to$mnistm" in tex and r"$\pm$" in tex
    assert r"\textbf{" not in tex  # the other rows have one seed: no interval to beat
    assert {p.name for p in out.glob("*.png")} == {"digits_da_last_bars.png", "digits_da_source_val_bars.png",
                                                  "digits_da_oracle_bars.png", "digits_da_curves.png"}


def test_report_errors_name_the_fix(tmp_path: Path):
    with pytest.raises(SystemExit, match="no run dirs"):
        report.main([str(tmp_path)])
    with pytest.raises(SystemExit):
        report.main([str(tmp_path), "--selection", "best"])


MIXED_GOLDEN = TESTS / "golden" / "mixed_report.md"


def _provenance(run_dir: Path, commit: str, dirty: bool, overrides: list[str]) -> None:
    entry = {"time": "2026-12-04T00:00:00+00:00", "tllab": "0.1.0", "git_commit": commit, "git_dirty": dirty,
             "overrides": overrides, "hardware": "CPU: 2 cores", "python": "3.11.7", "torch": "2.14.1"}
    (run_dir / "provenance.json").write_text(json.dumps({"commands": [entry]}))


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep as users make them: source only run with a shortened recipe (trainer.max_steps=20),
    AdaBN with the reference recipe but one seed evaluated more often, and AdaBN seed 0 run twice."""
    root = tmp_path_factory.mktemp("mixed")
    for seed in range(3):
        name = f"so_{seed}"
        _write_run(root, name, [f"seed={seed}", "trainer.max_steps=20"], 0.60 + 0.02 * seed)
        _provenance(root / name, "1111111aaaaaaa", False,
                    ["trainer.quiet=true", "trainer.max_steps=20", f"seed={seed}"])
        name = f"adabn_{seed}"
        every = ["trainer.eval_every=2"] if seed == 2 else []
        _write_run(root, name, [f"seed={seed}", "norm=adabn", *every], 1.0 + 0.02 * seed)
        _provenance(root / name, "2222222bbbbbbb", True, ["trainer.quiet=true", "norm=adabn", f"seed={seed}", *every])
    _write_run(root, "adabn_0_again", ["seed=0", "norm=adabn"], 1.1)  # same config and seed as adabn_0
    older = OmegaConf.load(root / "adabn_1" / "config.yaml")  # as written before backbone.head existed
    for key in ("head", "head_dim", "head_codes"):
        del older.backbone[key]
    (root / "adabn_1" / "config.yaml").write_text(OmegaConf.to_yaml(older))
    return root


def test_a_run_is_dirty_only_when_the_code_has_uncommitted_changes(tmp_path: Path, monkeypatch):
    """An edited README (or a report just written into docs/results) leaves the run clean; an edited
    module or config of tllab marks it ``+dirty``."""
    repo = tmp_path / "checkout"
    (repo / "tllab").mkdir(parents=True)
    (repo / "tllab" / "train.py").write_text("x = 1\n")
    (repo / "README.md").write_text("# tllab\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "init"]):
        subprocess.run([*git, *args], check=True)
    monkeypatch.setattr(launch, "CHECKOUT", repo)
    cfg, _ = resolve_config(compose_config([]))

    def dirty(name: str) -> bool:
        run_dir = tmp_path / name
        run_dir.mkdir()
        launch.record_provenance(run_dir, cfg, [])
        entry = json.loads((run_dir / "provenance.json").read_text())["commands"][0]
        assert len(entry["git_commit"]) == 40
        return entry["git_dirty"]

    assert dirty("clean") is False
    (repo / "README.md").write_text("# tllab, edited\n")
    assert dirty("docs_edited") is False
    (repo / "tllab" / "train.py").write_text("x = 2\n")
    assert dirty("code_edited") is True


def test_a_mixed_sweep_reports_recipes_duplicates_and_uncertainty_honestly(mixed_dir: Path, tmp_path: Path):
    ref_file = tmp_path / "refs.yaml"
    ref_file.write_text("- source: Reference recipe, 3 epochs\n  dataset: digits\n  setting: da\n"
                        "  recipe: {trainer.max_steps: null, trainer.epochs: 3}\n"
                        "  values:\n    source only: {mnist→mnistm: 34.9}\n    adabn: {mnist→mnistm: 54.3}\n")
    out = tmp_path / "out"
    report.main([str(mixed_dir), "--out", str(out), "--selection", "last", "--references", str(ref_file),
                 "--baseline", "source only", "--no-plots"])
    text = (out / "report.md").read_text().replace(str(mixed_dir), "<runs>")
    if not MIXED_GOLDEN.exists():  # first run writes the golden file, to be reviewed and committed
        MIXED_GOLDEN.write_text(text)
    assert text == MIXED_GOLDEN.read_text()
    # eval frequency and keys an older tllab did not write do not split the AdaBN row; the repeated seed counts once
    assert "| adabn |" in text and "| adabn (" not in text and "eval_every" not in text.split("## ")[1].split("\n\n")[1]
    assert "[ref 34.9; recipe differs: trainer.max_steps=20]" in text and "[ref 54.3, Δ -3.3]" in text
    assert "**51.0 ± 1.0 [ref 54.3, Δ -3.3]**" in text  # its interval clears the runner-up's
    assert r"\textbf{51.0 $\pm$ 1.0" in (out / "digits_da_last.tex").read_text()
    assert "Duplicate: `<runs>/adabn_0_again` repeats `<runs>/adabn_0`" in text
    assert "at commit 1111111, 2222222+dirty" in text and "CPU: 2 cores" in text
    cells = {(r["method"], r["task"]): r for r in csv.DictReader((out / "cells.csv").open())}
    adabn = cells[("adabn", "mnist→mnistm")]
    assert (int(adabn["n"]), float(adabn["mean"])) == (3, 51.0)
    assert float(adabn["ci95_low"]) == pytest.approx(51.0 - 4.302653 / math.sqrt(3), abs=1e-3)
    assert float(adabn["paired_mean"]) == 20.0 and adabn["paired_baseline"] == "source only"
    assert cells[("source only", "mnist→mnistm")]["delta"] == ""  # another recipe: no delta
    runs = {Path(r["run_dir"]).name: r for r in csv.DictReader((out / "runs.csv").open())}
    assert runs["adabn_0_again"]["duplicate_of"].endswith("adabn_0") and runs["adabn_0"]["duplicate_of"] == ""
    assert runs["adabn_1"]["git_commits"] == "2222222+dirty" and runs["so_0"]["hardware"] == "CPU: 2 cores"


def test_a_baseline_that_names_no_row_is_refused_in_one_line(mixed_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"^tllab: error: --baseline 'Source only' names no row of these tables; "
                                         r"choose one of: 'source only', 'adabn'\.$"):
        report.main([str(mixed_dir), "--out", str(out), "--selection", "last", "--baseline", "Source only"])
    assert not out.exists()  # a refused command writes nothing


@pytest.mark.parametrize(("values", "bold"), [
    ({"a": [50, 51, 52], "b": [30, 31, 32], "c": [10]}, [True, False, False]),  # clear winner
    ({"a": [50, 51, 52], "b": [49, 50, 51], "c": [30, 31, 32]}, [True, True, False]),  # tied with b
    ({"a": [50], "b": [30]}, [False, False]),  # one seed: no interval, never bold
])
def test_bold_marks_the_best_only_outside_the_noise(values, bold):
    from tllab.report.render import best_cells

    cells = [Cell(dict(enumerate(v))) for v in values.values()]
    assert best_cells(cells) == bold

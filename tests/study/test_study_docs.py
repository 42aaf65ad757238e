"""The study's page and the README's headline say what results/ holds, and nothing else.

The tables on docs/study.md are the committed Markdown files of results/study, included
verbatim at build time; here those files are regenerated from results.csv alone and must be
equal, the counts quoted in the text are recounted from the CSV, and every number in the
page's prose and in the README's headline is one of the tables' numbers, a recounted count,
or one of the few constants that define the setting (listed below).
"""

import os
import re

import pytest

from noisy_keras.analysis import stats
from noisy_keras.study import reports

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDY = os.path.join(REPO, "results", "study")
MNIST1D_TRAIN = 4000  # the mnist1d split the study trained on (docs/study.md, "Setting")
SETTING = {  # the constants of the setting, as the text writes them, without sign or comma
    "1", "2", "3", "4", "5", "7", "10", "11", "15", "16", "32", "60", "75", "100", "128",
    "200", "240", "256", "512", "960", "1000", "4000", "12394", "0.01", "0.04", "0.16", "0.9",
    "0.5", "0.8", "1e-5", "0.55", "1e-3", "1e-2", "20", "50", "101",
}  # fmt: skip
NUMBER = re.compile(r"(?<![\w.])[+-]?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?")


def _numbers(text: str) -> set[str]:
    return {n.lstrip("+-").replace(",", "") for n in NUMBER.findall(text)}


def _prose(text: str) -> str:
    """The text without code blocks, snippet includes, links' targets and figures."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"^--8<--.*$", "", text, flags=re.MULTILINE)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.sub(r"`[^`]*`", "", text)


@pytest.fixture(scope="module")
def rows():
    return reports.read_results_csv(os.path.join(STUDY, "results.csv"))


def test_the_committed_tables_are_what_results_csv_gives(rows, tmp_path):
    reports.write_differences(str(tmp_path), rows, "study_mnist1d-b32-none")
    reports.write_differences(str(tmp_path), rows, "study_mnist1d-b512-none", "differences_vs_b512")
    for name in ("differences.md", "differences_vs_b512.md", "differences.csv"):
        assert open(tmp_path / name).read() == open(os.path.join(STUDY, name)).read(), name
    table = reports.markdown_table(reports.summarize_rows(rows))
    assert table == open(os.path.join(STUDY, "table.md")).read()


def test_the_counts_in_the_text_are_the_csvs(rows):
    page = open(os.path.join(REPO, "docs", "study.md")).read()
    cells = {}
    for row in rows:
        assert row["status"] == "done"
        cells.setdefault(row["cell"], []).append(row)
    seeds = {len(runs) for runs in cells.values()}
    assert seeds == {5} and f"{len(cells)} cells, 5 seeds" in page
    assert f"{len(rows)} runs" in page and len(rows) == 55
    updates = {
        cell: runs[0]["epochs"] * (MNIST1D_TRAIN // runs[0]["batch_size"])
        for cell, runs in cells.items()
    }
    assert f"{updates['study_mnist1d-b32-none']:,} at B=32" in page
    assert f"{updates['study_mnist1d-b128-none']:,} at B=128" in page
    assert f"{updates['study_mnist1d-b512-none']:,} at B=512" in page
    assert f"{updates['study_mnist1d_gbn-b512-none']:,} updates) and" in page
    assert f"like B=32: {updates['study_mnist1d_linear-b512-none']} updates" in page


def test_every_number_in_the_prose_is_a_table_number_a_count_or_a_setting(rows):
    tables = "".join(
        open(os.path.join(STUDY, name)).read()
        for name in ("table.md", "differences.md", "differences_vs_b512.md", "noise_temperature.md")
    )
    allowed = _numbers(tables) | SETTING | {"55", "7500", "7440", "6720", "420", "125"}
    page = _prose(open(os.path.join(REPO, "docs", "study.md")).read())
    assert _numbers(page) - allowed == set()


def test_the_readme_headline_is_the_study_and_the_reproduction(rows):
    readme = open(os.path.join(REPO, "README.md")).read()
    start = readme.index("## Does the noise close the gap?")
    headline = _prose(readme[start : readme.index("\n## ", start + 1)])
    offline = reports.read_results_csv(os.path.join(REPO, "results", "offline", "results.csv"))
    by_cell = {}
    for row in offline:
        by_cell.setdefault((row["base"], row["batch_size"], row["alpha"]), []).append(
            row["val_accuracy"]
        )
    differences, p_values = [], []
    for (base, batch, alpha), noisy in by_cell.items():
        if alpha == 1e-5:
            d = stats.welch_difference(noisy, by_cell[(base, batch, 0.0)])
            differences.append(100 * d.difference)
            p_values.append(d.p_value)
    low, high = f"{min(differences):+.2f}", f"{max(differences):+.2f}"
    assert f"by {low} to {high} points" in headline
    assert min(p_values) >= 0.35 and "none\nwith p below 0.35" in headline
    assert f", {len(offline)} runs)" in headline and f"seeds = {len(rows)} runs" in headline
    study = "".join(
        open(os.path.join(STUDY, n)).read() for n in ("differences.md", "differences_vs_b512.md")
    )
    allowed = _numbers(study) | SETTING | {str(len(rows)), str(len(offline)), "0.35"}
    allowed |= {low.lstrip("+-"), high.lstrip("+-")}
    assert _numbers(headline) - allowed == set()
    assert len(differences) == 8  # 2 data sets x 4 batch sizes


PAPER = {"64", "74.45", "70.29", "67.86", "72.07", "71.01", "0.42"}  # Table 2, quoted as such
REPRODUCTION = {"1e-4", "0.32", "25", "40", "95"}  # lr at B=1024, decay epochs, CI level


def test_the_reproduction_page_quotes_its_tables_and_counts():
    page = open(os.path.join(REPO, "docs", "reproduction.md")).read()
    offline = reports.read_results_csv(os.path.join(REPO, "results", "offline", "results.csv"))
    longer = reports.read_results_csv(os.path.join(REPO, "results", "longer", "results.csv"))
    assert f"\n{len(offline)} runs;" in page and len(offline) == 160
    assert f"# {len(longer)} runs" in page and len(longer) == 15
    for name in ("offline", "longer"):  # the tables are the committed files, included
        assert f'--8<-- "results/{name}/table.md"' in page
    # the recipe's seed-0 run that the page says `--recipe=digits_b1024_noise` prints
    (row,) = [r for r in offline if r["cell"] == "repro_digits-b1024-a1e-05" and r["seed"] == 0]
    assert f"accuracy {row['val_accuracy']:.4f}, the value in" in page
    # updates per epoch of the "trained longer" comparison: full batches of the digits split
    from noisy_keras.data.datasets import load_dataset

    digits = load_dataset("digits")
    assert f"among the {digits.num_train:,} training digits" in page
    assert f"B=128's {digits.steps_per_epoch(128) * 30} in 30 epochs" in page
    assert f"{digits.steps_per_epoch(1024) * 240} updates of the one full batch" in page
    tables = "".join(
        open(os.path.join(REPO, "results", name, "table.md")).read()
        for name in ("offline", "longer")
    )
    allowed = _numbers(tables) | SETTING | PAPER | REPRODUCTION
    allowed |= {"160", "15", "0.9401", "300", "1346"}
    assert _numbers(_prose(page)) - allowed == set()

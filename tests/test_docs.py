"""The documentation site: it builds with `--strict`, and its API reference has every public name.

The site's source is `docs/` and `mkdocs.yml` (the `[docs]` extra installs MkDocs,
Material and mkdocstrings; `[test]` includes them). A build in strict mode fails on any
warning: a broken link or anchor, a page outside the navigation, a docstring whose
`Args:` name a parameter the signature lacks.
"""

import html
import inspect
import os
import re
import subprocess
import sys

import pytest

import noisy_keras

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _text(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def test_the_api_reference_documents_every_public_name_from_its_docstring(site):
    page = open(os.path.join(site, "reference", "index.html")).read()
    anchors = re.findall(r'id="noisy_keras\.(\w+)"', page)
    assert sorted(set(anchors)) == sorted(noisy_keras.__all__)
    for name in noisy_keras.__all__:
        start = page.index(f'id="noisy_keras.{name}"')
        following = _text(page[start : start + 20000])
        obj = getattr(noisy_keras, name)
        if isinstance(obj, float):  # a constant: its value and its attribute docstring
            assert f"{name} = {obj!r}" in following, name
            assert "schedule" in following[:300], name
        else:
            first_line = inspect.getdoc(obj).split("\n")[0]
            letters = lambda text: re.sub(r"\W", "", text)  # Markdown's code marks and spaces go
            assert letters(first_line)[:40] in letters(following[:2000]), name


def test_every_page_is_in_the_navigation_and_the_figures_are_the_committed_files(site):
    pages = {
        os.path.relpath(os.path.join(folder, name), os.path.join(REPO, "docs"))
        for folder, _, names in os.walk(os.path.join(REPO, "docs"))
        for name in names
        if name.endswith(".md")
    }
    config = open(os.path.join(REPO, "mkdocs.yml")).read()
    assert {p for p in pages if f": {p}\n" not in config} == set()
    for page in pages:
        text = open(os.path.join(REPO, "docs", page)).read()
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
            assert not target.startswith("http"), f"{page}: {target} is not a file of results/"
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), target))
            assert resolved.startswith("results" + os.sep), (page, target)
            assert os.path.isfile(os.path.join(REPO, resolved)), (page, target)
            with open(os.path.join(REPO, resolved), "rb") as committed:
                served = os.path.join(site, resolved)
                assert open(served, "rb").read() == committed.read(), (page, target)

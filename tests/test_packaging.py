"""The package's metadata: one version, the licence it declares, links that work off GitHub."""

import configparser
import os
import re

import noisy_keras

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAW = "https://raw.githubusercontent.com/noisy-keras/noisy_keras/main/"
BLOB = "https://github.com/noisy-keras/noisy_keras/blob/main/"


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    return parser


def test_the_version_is_written_once():
    assert _setup_cfg()["metadata"]["version"] == "attr: noisy_keras.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", noisy_keras.__version__)
    # No other module of the package spells the version out.
    quoted = f'"{noisy_keras.__version__}"'
    hits = [
        os.path.join(directory, name)
        for directory, _, names in os.walk(os.path.join(REPO, "noisy_keras"))
        for name in names
        if name.endswith(".py") and name != "__init__.py"
        if quoted in open(os.path.join(directory, name)).read()
    ]
    assert hits == []


def test_the_declared_licence_ships_and_the_changelog_follows_keep_a_changelog():
    metadata = _setup_cfg()["metadata"]
    assert metadata["license"] == "Apache-2.0" and metadata["license_files"].strip() == "LICENSE"
    licence = open(os.path.join(REPO, "LICENSE")).read()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence
    changelog = open(os.path.join(REPO, "CHANGELOG.md")).read()
    assert "## [Unreleased]" in changelog and "keepachangelog.com" in changelog
    assert os.path.isfile(os.path.join(REPO, "noisy_keras", "py.typed"))
    urls = metadata["project_urls"]
    for label in ("Source", "Documentation", "Changelog", "Issues"):
        assert re.search(rf"^{label} = https://", urls, re.MULTILINE), label


def test_readme_images_and_links_are_absolute_and_name_files_of_the_repository():
    readme = open(os.path.join(REPO, "README.md")).read()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert images, "the README shows the study's figures"
    for url in images:
        assert url.startswith(RAW), url  # a package index page resolves no relative path
        assert os.path.isfile(os.path.join(REPO, url[len(RAW) :])), url
    for url in re.findall(r"\]\(([^)#]+)\)", readme):
        assert url.startswith(("https://", "http://")), f"relative link {url!r}"
        if url.startswith(BLOB):
            assert os.path.exists(os.path.join(REPO, url[len(BLOB) :])), url

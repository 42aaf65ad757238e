"""MkDocs hook: the figures and tables of results/ are served from the repository's copy.

The docs link them as `results/...` (relative to the docs root, e.g.
`../results/study/val_study_mnist1d.png` from a page one level down), so a figure on a page is
always the file the study committed, never a copy that could drift from it.
"""

import os

from mkdocs.structure.files import File

_SHOWN = (".png", ".csv")  # a .md would become a page


def on_files(files, config):
    root = os.path.dirname(config["config_file_path"])
    results = os.path.join(root, "results")
    for folder, _, names in os.walk(results):
        for name in sorted(names):
            in_a_run = "runs" in os.path.relpath(folder, results).split(os.sep)
            if not name.endswith(_SHOWN) or in_a_run:
                continue
            path = os.path.relpath(os.path.join(folder, name), root)
            files.append(
                File(
                    path,
                    src_dir=root,
                    dest_dir=config["site_dir"],
                    use_directory_urls=False,  # served as files, never as pages
                )
            )
    return files

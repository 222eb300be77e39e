"""The README's layout section lists every module of the package, and nothing that is not there."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layout_section_matches_the_tree():
    readme = open(os.path.join(REPO, "README.md")).read()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    listed, folder = set(), ""
    for line in block.strip().splitlines():
        entry = line.split()[0]
        if line.startswith("  "):  # a file of the folder above
            entry = folder + entry
        elif entry.endswith("/"):
            folder = entry
        if "{" in entry:  # a{b,c}.py
            head, names, tail = re.match(r"(.*)\{(.*)\}(.*)", entry).groups()
            listed |= {head + name + tail for name in names.split(",")}
        else:
            listed.add(entry)
    modules = {
        os.path.relpath(os.path.join(root, name), REPO)
        for root, _, files in os.walk(os.path.join(REPO, "mobilenet_jax"))
        for name in files
        if name.endswith(".py") and name != "__init__.py"
    }
    assert modules - listed == set(), "modules missing from the README layout"
    listed_modules = {entry for entry in listed if re.match(r"mobilenet_jax/.*\.py$", entry)}
    assert listed_modules - modules == set(), "README lists modules that do not exist"

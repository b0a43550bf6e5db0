"""Maps the repository's folders into the single `mmreduce` namespace (see ARCHITECTURE.md §1).

`adapters/` installs as `mmreduce.adapters` (a top-level `adapters` would clash with the PyPI package of that
name) and `eval/` as `mmreduce.eval` (a top-level `eval` would shadow the builtin). Everything else is in
pyproject.toml.
"""

from setuptools import find_packages, setup

PACKAGE_ROOTS = {
    "mmreduce": "mmreduce",
    "mmreduce.adapters": "adapters",
    "mmreduce.tokenizers_visual": "tokenizers_visual",
    "mmreduce.eval": "eval",
    "mmreduce.demo": "demo",
}

packages = []
for package, folder in PACKAGE_ROOTS.items():
    packages.append(package)
    packages += [f"{package}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=PACKAGE_ROOTS,
    package_data={
        "mmreduce.eval": ["checkpoints/**/*", "assets/**/*", "lmms_tasks/**/*"],
        "mmreduce.tokenizers_visual": ["checkpoints/**/*"],
        "mmreduce.demo": ["assets/**/*"],
    },
    include_package_data=True,
)

"""Re-execute chapter notebooks in place and normalize their metadata.

Usage: python scripts/execute_notebooks.py chapters/*.ipynb

Each notebook runs top to bottom in a fresh ``python3`` kernel from the
chapter's folder, so its stored outputs are exactly what a reader's fresh run
prints. Metadata that changes from run to run (timings, Python patch version,
widget state) is removed, so a diff shows only real changes.
"""

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

KERNEL_NAME = "python3"
TIMEOUT_SECONDS = 300


def normalize(notebook: nbformat.NotebookNode) -> None:
    """Keep only the metadata that is the same on every machine and every run."""
    notebook.metadata = nbformat.from_dict(
        {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": KERNEL_NAME},
            "language_info": {"name": "python"},
        }
    )
    for cell in notebook.cells:
        kept = {key: value for key, value in cell.metadata.items() if key in ("tags",)}
        cell.metadata = nbformat.from_dict(kept)
        for output in cell.get("outputs", []):
            if "metadata" in output and not output.metadata:
                continue
            if "metadata" in output:
                output.metadata.pop("execution", None)


def execute(path: Path) -> float:
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=TIMEOUT_SECONDS,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    normalize(notebook)
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    return elapsed


def main(paths: list[str]) -> int:
    if not paths:
        print("usage: python scripts/execute_notebooks.py NOTEBOOK [NOTEBOOK ...]", file=sys.stderr)
        return 2
    for name in paths:
        elapsed = execute(Path(name))
        print(f"{name}: executed in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

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
        if cell.cell_type != "code":
            continue
        cell.outputs = merge_streams(cell.outputs)
        for output in cell.outputs:
            if "metadata" in output:
                output.metadata.pop("execution", None)


def merge_streams(outputs: list) -> list:
    """Join consecutive outputs of the same stream into one.

    The kernel flushes stdout at moments that depend on timing, so one run can
    store a cell's printed text as one output and the next as several. Joining
    them makes the stored notebook the same on every run; nbval joins them the
    same way before it compares.
    """
    merged = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (
            output.output_type == "stream"
            and previous is not None
            and previous.output_type == "stream"
            and previous.name == output.name
        ):
            previous.text += output.text
        else:
            merged.append(output)
    return merged


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

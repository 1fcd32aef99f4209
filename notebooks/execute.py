"""Executes the notebooks in place, so the repository shows their outputs.

Run from the repository root: ``python notebooks/execute.py [NAME ...]``
(``make notebooks``). Each notebook runs in a fresh kernel in a temporary
directory (its runs and prepared data stay there), with the repository on
``PYTHONPATH``. Notebook 02 is the GPU/TPU CIFAR-10 run: here it is executed
with ``smoke_test = True`` (a few steps of a small CNN on the offline digits),
set in a cell tagged ``injected-parameters`` that the committed file shows.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# Overrides of a notebook's parameters for the committed run.
COMMITTED_OVERRIDES = {"02_paper_reproduction.ipynb": {"smoke_test": True}}


def _inject(nb: nbformat.NotebookNode, overrides: dict) -> None:
  """Adds a cell after the one tagged ``parameters`` (papermill's way)."""
  index = next(
      i for i, c in enumerate(nb.cells)
      if "parameters" in c.get("metadata", {}).get("tags", [])
  )
  source = "# Parameters of this committed run\n" + "".join(
      f"{k} = {v!r}\n" for k, v in overrides.items()
  )
  cell = nbformat.v4.new_code_cell(source)
  cell.metadata["tags"] = ["injected-parameters"]
  cell["id"] = "injected-parameters"
  nb.cells.insert(index + 1, cell)


def _clean(nb: nbformat.NotebookNode) -> None:
  """Drops what changes on every run without meaning anything."""
  for cell in nb.cells:
    cell.metadata.pop("execution", None)
    cell.metadata.pop("papermill", None)
  nb.metadata.pop("papermill", None)


def prepare_data(data_dir: str) -> None:
  """Prepares the offline digits once, so no notebook shows TFDS preparing."""
  import subprocess  # pylint: disable=g-import-not-at-top
  subprocess.run(
      [sys.executable, "-c",
       "import sys; from experiments import data; "
       "data.load('mnist5k', data_dir=sys.argv[1])", data_dir],
      check=True, cwd=ROOT, capture_output=True)


def execute(name: str, data_dir: str) -> None:
  path = NOTEBOOKS / name
  nb = nbformat.read(path, as_version=4)
  nb.cells = [
      c for c in nb.cells
      if "injected-parameters" not in c.get("metadata", {}).get("tags", [])
  ]
  if name in COMMITTED_OVERRIDES:
    _inject(nb, COMMITTED_OVERRIDES[name])
  with tempfile.TemporaryDirectory() as tmp:
    os.environ["TFDS_DATA_DIR"] = data_dir
    client = nbclient.NotebookClient(
        nb, timeout=1800, kernel_name="python3",
        resources={"metadata": {"path": tmp}},
    )
    client.execute()
  _clean(nb)
  nbformat.validate(nb)
  nbformat.write(nb, path)
  print(f"executed {name}")


def main(argv: list[str]) -> None:
  names = argv or sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
  env_path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
  os.environ["PYTHONPATH"] = os.pathsep.join(env_path)
  os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
  with tempfile.TemporaryDirectory() as data_dir:
    prepare_data(data_dir)
    for name in names:
      execute(name, data_dir)


if __name__ == "__main__":
  main(sys.argv[1:])

"""Every notebook runs top to bottom in a fresh kernel, with small parameters,
and is committed with the outputs of a full run (``make notebooks``).

papermill injects the overrides below after each notebook's cell tagged
``parameters`` and executes it through nbclient; any error fails the test.
"""

import json
import os
import pathlib

import pytest

papermill = pytest.importorskip("papermill")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"

# Small sizes, offline data; keys must exist in the notebook's parameters cell.
OVERRIDES = {
    "01_quickstart.ipynb": dict(num_workers=4, epochs=1, seeds=1),
    "02_paper_reproduction.ipynb": dict(smoke_test=True),
    "03_how_delay_compensation_works.ipynb": dict(
        num_workers=4, num_steps=60, seeds=1
    ),
}


def _parameters_cell(nb: dict) -> str:
  for cell in nb["cells"]:
    if "parameters" in cell.get("metadata", {}).get("tags", []):
      return "".join(cell["source"])
  raise AssertionError("no cell tagged 'parameters'")


def test_every_notebook_has_overrides():
  assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(OVERRIDES)


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_notebook_is_colab_ready(name):
  nb = json.loads((NOTEBOOKS / name).read_text())
  first = "".join(nb["cells"][0]["source"])
  assert "colab.research.google.com/github/" in first and name in first
  assert "pip" in "".join(nb["cells"][1]["source"])  # the install cell
  params = _parameters_cell(nb)
  for key in [*OVERRIDES[name], "data_dir"]:
    assert f"{key} =" in params, f"{key} is not a parameter of {name}"


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_notebook_is_committed_with_its_outputs(name):
  """Rendered on the repository page and in the docs: every code cell ran
  (``make notebooks``), in order, without an error, and the plots are in."""
  nb = json.loads((NOTEBOOKS / name).read_text())
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  counts = [c.get("execution_count") for c in code]
  assert all(counts), f"{name} has cells that were not executed"
  assert counts == sorted(counts), f"{name} was not run top to bottom"
  outputs = [o for c in code for o in c.get("outputs", [])]
  assert not [o for o in outputs if o["output_type"] == "error"]
  assert any(
      "image/png" in o.get("data", {}) for o in outputs
  ), f"{name} shows no plot"


# The quickstart runs in `make test`; the other two (20-40 s each) in `make
# test-slow`, which CI runs too.
@pytest.mark.parametrize(
    "name",
    [
        n if n.startswith("01_") else pytest.param(n, marks=pytest.mark.slow)
        for n in sorted(OVERRIDES)
    ],
)
def test_notebook_runs(name, tmp_path, monkeypatch):
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # The kernel runs outside the checkout: the repository's experiments/ (not
  # installed by the wheel) reaches it through PYTHONPATH, as in Colab after
  # the install cell's clone.
  path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
  monkeypatch.chdir(tmp_path)
  # Each notebook prepares the offline digits in its own TFDS dir: parallel
  # tests never race on a shared ~/tensorflow_datasets.
  parameters = dict(OVERRIDES[name], data_dir=str(tmp_path / "tfds"))
  committed = (NOTEBOOKS / name).read_bytes()
  papermill.execute_notebook(
      str(NOTEBOOKS / name),
      str(tmp_path / name),
      parameters=parameters,
      kernel_name="python3",
      cwd=str(tmp_path),
      progress_bar=False,
      execution_timeout=600,
  )
  out = json.loads((tmp_path / name).read_text())
  errors = [
      o
      for c in out["cells"]
      for o in c.get("outputs", [])
      if o.get("output_type") == "error"
  ]
  assert not errors
  # The run writes its own copy: the committed notebook is left as it was.
  assert (NOTEBOOKS / name).read_bytes() == committed

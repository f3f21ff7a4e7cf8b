"""The Colab notebooks in `experiments/colab/` run headless, top to bottom, on the CPU.

Each is executed by nbclient in a fresh kernel with `SMOKE = True` put after its `parameters`
cell (as papermill does), in a temporary directory; any cell that raises fails the test. Their
asserts (the store notebook's tamper check, for one) count as the notebook's own tests. The
committed files carry no outputs.
"""

import glob
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import nbclient
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "experiments", "colab", "*.ipynb")))
NAMES = ("families", "probe", "store")


def _with_smoke(notebook):
  """`notebook` with a cell setting SMOKE = True right after its parameters cell."""
  index = [i for i, cell in enumerate(notebook.cells)
           if "parameters" in cell.metadata.get("tags", ())]
  if len(index) != 1:
    raise ValueError(f"a notebook needs exactly one cell tagged 'parameters', found {len(index)}")
  notebook.cells.insert(index[0] + 1, nbformat.v4.new_code_cell("SMOKE = True"))
  return notebook


class NotebookTest(parameterized.TestCase):

  def test_every_notebook_is_tested(self):
    self.assertEqual(tuple(os.path.basename(p)[:-len(".ipynb")] for p in NOTEBOOKS), NAMES)

  @parameterized.parameters(*NAMES)
  def test_committed_without_outputs(self, name):
    notebook = nbformat.read(os.path.join(REPO, "experiments", "colab", f"{name}.ipynb"),
                             as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
      if cell.cell_type == "code":
        self.assertEqual(cell.outputs, [], cell.source[:80])
        self.assertIsNone(cell.execution_count)

  @parameterized.parameters(*NAMES)
  def test_runs_headless_on_the_cpu(self, name):
    notebook = _with_smoke(nbformat.read(
        os.path.join(REPO, "experiments", "colab", f"{name}.ipynb"), as_version=4))
    workdir = tempfile.mkdtemp(prefix=f"memkernel_notebook_{name}_")
    # The kernel inherits this process's environment: CPU, the suite's compile flags and cache.
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": workdir}})
    client.execute()  # Raises CellExecutionError naming the cell and its traceback.
    text = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.outputs)
    self.assertIn("JAX", text)
    if name == "probe":
      self.assertTrue(os.path.exists(os.path.join(workdir, "runs", "mqar_scattered",
                                                  "audit.png")))
      images = [out for cell in notebook.cells if cell.cell_type == "code"
                for out in cell.outputs if "image/png" in out.get("data", {})]
      self.assertLen(images, 3)  # Training curves, lengths, the audit.

  def test_a_notebook_without_parameters_is_refused(self):
    with self.assertRaisesRegex(ValueError, "exactly one cell tagged 'parameters'"):
      _with_smoke(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]))


if __name__ == "__main__":
  absltest.main()

"""examples/digits_in_memory.ipynb runs top to bottom in a real Jupyter kernel and shows a result.

The kernel is started from a kernelspec written at test time whose command is this test's own
interpreter (``sys.executable -m ipykernel_launcher``), so it sees exactly the evalkit and
packages the test sees, whatever kernels the machine has installed.
"""
from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ipykernel  # noqa: F401  (the test extra installs all three: a missing one must fail, not skip)
import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "digits_in_memory.ipynb"
KERNEL = "evalkit-test-python"


def _kernel_manager(tmp_path: Path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "evalkit test kernel", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def _outputs(nb) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def _text(out) -> str:
    if out.output_type == "stream":
        return out.text
    return out.get("data", {}).get("text/plain", "")


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "clear the notebook's outputs before committing"


# 25-70 s on 2 busy cores (training, then t-SNE/UMAP/PCA of 4 feature sets); `-m 'not slow'` skips it.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_notebook_runs_and_shows_the_result(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=600, allow_errors=False,
                                     resources={"metadata": {"path": str(work)}})
    client.execute()

    outputs = _outputs(nb)
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors

    # The last expression of the evaluate cell is `result`: Jupyter shows its _repr_html_.
    htmls = [o["data"]["text/html"] for o in outputs
             if o.output_type in ("execute_result", "display_data") and "text/html" in o.get("data", {})]
    views = [h for h in htmls if "evalkit-result" in h]
    assert len(views) == 1, [h[:200] for h in htmls]
    view = views[0]
    assert "digits-in-memory" in view and "899 samples" in view and "10 classes" in view
    assert "the check passed" in view, view[:500]  # the one check, on its one row
    srcdoc = re.search(r'<iframe srcdoc="([^"]*)"', view)
    assert srcdoc, view[:500]
    page = html.unescape(srcdoc.group(1))
    assert "Embeddings" in page
    for name in ("cnn", "untrained", "penultimate", "conv2", "t-SNE", "UMAP", "PCA"):
        assert name in page, name

    printed = "".join(_text(o) for o in outputs)
    assert "checks passed: True" in printed
    rows = re.findall(r"^(cnn|untrained)\s+(penultimate|conv2)\s+([0-9.]+)\s+(-?[0-9.]+)$", printed, re.M)
    assert len(rows) == 4, printed
    knn = {(m, layer): float(k) for m, layer, k, _ in rows}
    assert knn["cnn", "penultimate"] >= 0.9
    assert knn["cnn", "penultimate"] > knn["untrained", "penultimate"]

    out = work / "reports" / "out" / "notebook"
    assert (out / "index.html").is_file() and (out / "metrics.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert {(r["model"], r["layer"]) for r in metrics["rows"]} == {
        (m, layer) for m in ("cnn", "untrained") for layer in ("penultimate", "conv2")}
    check = subprocess.run([sys.executable, "-m", "evalkit", "check", str(out)], cwd=work,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr

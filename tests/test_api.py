"""The public API re-exported from ``vaeflow`` (docs/design.md §2): every name resolves
to the object of the module that defines it, lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import vaeflow


def test_every_exported_name_resolves_to_its_definition():
    for name in vaeflow.__all__:
        value = getattr(vaeflow, name)
        if name != "__version__":
            module = sys.modules[vaeflow._EXPORTS[name]]
            assert value is getattr(module, name), name
    assert {"train", "build_model", "VAE", "load_splits", "evaluate_run"} <= set(dir(vaeflow))


def test_import_vaeflow_is_light():
    """``import vaeflow`` (e.g. for ``__version__``) imports no torch."""
    code = "import sys, vaeflow; print(vaeflow.__version__, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [vaeflow.__version__, "False"]


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        vaeflow.no_such_name  # noqa: B018

"""The torchvision repair must make imports work here and do nothing where torchvision is healthy."""

import subprocess
import sys
import textwrap

import torch

from adamerge.compat import torchvision_ops


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_adamerge_makes_torchvision_lightning_open_clip_importable():
    out = run_python("""
        import adamerge, torch
        import torchvision, lightning, open_clip
        from torchvision.transforms import v2
        print(adamerge.TORCHVISION_REPAIR, tuple(v2.Resize(8)(torch.rand(3, 16, 16)).shape))
    """)
    action, shape = out.split(maxsplit=1)
    assert action in {"extension", "schemas"}
    assert shape.strip() == "(3, 8, 8)"


def test_healthy_extension_is_loaded_and_nothing_is_declared(monkeypatch):
    loaded, declared = [], []
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: loaded.append(path))
    monkeypatch.setattr(torchvision_ops, "declare_missing_schemas", lambda: declared.append(1) or [])
    assert torchvision_ops.ensure_torchvision_importable() == "extension"
    assert loaded and loaded[0].endswith((".so", ".pyd", ".dylib")) and not declared


def test_broken_extension_declares_the_schemas(monkeypatch):
    declared = []

    def fail(path):
        raise OSError("undefined symbol: simulated")

    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(torch.ops, "load_library", fail)
    monkeypatch.setattr(torchvision_ops, "declare_missing_schemas", lambda: declared.append(1) or ["nms"])
    assert torchvision_ops.ensure_torchvision_importable() == "schemas"
    assert declared == [1]


def test_already_imported_torchvision_is_left_alone():
    import torchvision  # noqa: F401

    assert torchvision_ops.ensure_torchvision_importable() == "untouched"


def test_declaring_is_idempotent_once_the_ops_exist():
    torchvision_ops.declare_missing_schemas()
    assert torchvision_ops._op_exists("nms") and torchvision_ops._op_exists("qnms")
    assert torchvision_ops.declare_missing_schemas() == []


def test_the_repair_is_needed_exactly_where_the_extension_cannot_load():
    """Without the repair, this machine's torchvision fails to import exactly when adamerge had to declare the
    schemas; where the extension loads natively, adamerge used it and changed nothing."""
    import adamerge

    expected = {"extension": "healthy", "schemas": "broken"}[adamerge.TORCHVISION_REPAIR]
    out = run_python("""
        import torch, importlib.util, pathlib
        spec = importlib.util.find_spec("torchvision")
        lib = next(p for p in pathlib.Path(spec.submodule_search_locations[0]).glob("_C*"))
        try:
            torch.ops.load_library(str(lib)); print("healthy")
        except OSError:
            try:
                import torchvision
                print("imported")
            except RuntimeError as e:
                print("broken" if "torchvision::nms" in str(e) else f"other {e}")
    """)
    assert out.strip() == expected

"""A process started in a clone imports Hugging Face's `kernels`, never the clone's kernels/.

transformers >= 5.25 imports the `kernels` distribution from modeling_utils; the clone's
top-level kernels/ folder must not shadow it (issue 24), while `unipelt_fast.kernels` stays this
project's kernels in an editable install, in a wheel, and under both ways of starting pytest.
"""

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run from the clone's root, where '' / the cwd leads sys.path (python -c, python -m, a REPL).
PROBE = (
    "import transformers.modeling_utils, kernels, unipelt_fast.kernels, pathlib, sys\n"
    "import unipelt_fast.kernels.prefix_attention as pa\n"
    "root = pathlib.Path(sys.argv[1]).resolve()\n"
    "assert root / 'kernels' not in pathlib.Path(kernels.__file__).resolve().parents, kernels.__file__\n"
    "assert hasattr(kernels, 'get_kernel'), 'not the kernels distribution'\n"
    "assert pathlib.Path(pa.__file__).resolve().parent == pathlib.Path(sys.argv[2]).resolve()\n"
)

def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_hf_kernels = pytest.mark.skipif(
    not _has_distribution("kernels"),
    reason="the `kernels` distribution is not installed (transformers < 5.25 does not need it)",
)


def _env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def test_kernels_folder_is_not_a_regular_package():
    assert (ROOT / "kernels" / "prefix_attention.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the clone's folder shadow Hugging Face's `kernels`"
    )


@needs_hf_kernels
def test_python_c_in_the_clone_imports_both():
    r = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT), str(ROOT / "kernels")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]


@needs_hf_kernels
@pytest.mark.parametrize("runner", ["python -m pytest", "pytest"])
def test_pytest_in_the_clone_imports_both(runner, tmp_path):
    test = tmp_path / "test_probe.py"
    test.write_text(
        "import sys\n"
        f"def test_probe():\n    sys.argv = ['probe', {str(ROOT)!r}, {str(ROOT / 'kernels')!r}]\n"
        f"    exec({PROBE!r}, {{}})\n"
    )
    exe = [sys.executable, "-m", "pytest"] if runner != "pytest" else [
        str(Path(sys.executable).parent / "pytest")]
    r = subprocess.run(
        [*exe, "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), str(test)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@needs_hf_kernels
def test_wheel_installs_kernels_inside_the_package(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    assert "unipelt_fast/kernels/prefix_attention.py" in names
    assert not any(n.split("/")[0] == "kernels" for n in names), "a top-level kernels in the wheel"
    # The unpacked wheel first on sys.path: unipelt_fast (and its kernels) come from it.
    env = _env()
    env["PYTHONPATH"] = str(site)
    r = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT), str(site / "unipelt_fast" / "kernels")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]

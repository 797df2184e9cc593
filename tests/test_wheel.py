"""A wheel built from the repo works outside it: bundled configs and the embedded model are package data."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin dir, a working directory outside the repo): the wheel of a copy of the repo's sources, installed
    (not editable) in a fresh venv that sees this environment's packages (--no-deps: nothing is downloaded)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO / "mtp_jax", src / "mtp_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src], check=True)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True)
    wheel = next((tmp / "dist").glob("mtp_jax-*.whl"))
    subprocess.run([*pip, "--python", venv / "bin" / "python", "install", "--no-deps", wheel], check=True)
    work = tmp / "elsewhere"
    work.mkdir()
    return venv / "bin", work


def _run(installed, *args: str) -> str:
    bin_dir, work = installed
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ""}
    p = subprocess.run([bin_dir / args[0], *args[1:]], cwd=work, env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_installed_package_is_the_wheel(installed):
    out = _run(installed, "python", "-c", "import mtp_jax; print(mtp_jax.__file__)")
    assert str(installed[0].parent) in out and str(REPO) not in out


@pytest.mark.slow
def test_params_of_a_bundled_config_from_the_wheel(installed):
    out = _run(installed, "mtp-jax", "params", "--config", "glm-4.5")
    assert "total:  352,797,829,024" in out and "nextn_total:" in out


@pytest.mark.slow
def test_readme_main_job_from_the_wheel(installed):
    """`mtp-jax generate --compare` with the embedded model (shortened)."""
    out = _run(installed, "mtp-jax", "generate", "--compare", "--max-new-tokens", "8", "--repeats", "1")
    assert "MTP speculative, K=auto" in out and "outputs identical" in out

"""An installed kiln (a wheel, not the editable checkout) carries what `kiln launch` reads at
run time: the sbatch template is package data of `launch`, found from the installed package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pretrain", "data_pipeline", "launch", "hydra_conf")  # pyproject's packages.find
TEMPLATE = "launch/templates/job.sbatch.tmpl"


def test_the_wheel_ships_the_slurm_template_and_launch_finds_it(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building in the checkout would write build/ there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, source / name)
    for name in PACKAGES:
        shutil.copytree(ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("kiln-*.whl")
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        assert TEMPLATE in archive.namelist()
        archive.extractall(installed)  # a pure wheel's files, as pip installs them
    # the installed launch package (PYTHONPATH comes before the editable install's finder)
    probe = "import launch.slurm as s; print(s.__file__); print(s.TEMPLATE)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": str(installed), "PATH": ""}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    module, template = map(Path, result.stdout.split())
    assert module == installed / "launch" / "slurm.py"
    assert template == installed / TEMPLATE
    assert template.read_text() == (ROOT / TEMPLATE).read_text()

#!/usr/bin/env bash
# Run tests under another PyTorch release than the project's venv holds, on the CPU: the release
# a GPU host carries (the H200 image: torch 2.11.0), so the code paths bench/gpu.py drives are
# checked against that torch before device time is spent on them.
#
#   bash scripts/test-with-torch.sh [VERSION] [pytest args...]
#
# VERSION defaults to 2.11.0. A venv in .torch-VERSION/ (git-ignored; the PyPI wheel with its CUDA
# libraries, about 4.6 GB, installed once) holds that torch alone and reads every other package
# and kiln itself from .venv through a .pth file placed after its own site-packages, so the one
# torch under test is the one imported. `kiln` in its bin/ is a shim over launch.cli, since the
# tests start `kiln` and `torchrun` from beside sys.executable. With no pytest args it runs the
# tests of what a GPU run exercises: the GPU script's smoke and --check modes, compiled and
# chunked losses and FP8 under each engine, MoE (grouped GEMM), the models and kiln plan.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-2.11.0}"
shift || true
venv=".torch-$version"
main_site="$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')"

if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    # pip's machine-wide constraint file caps torch at the release on disk; this venv wants
    # another one, so it reads no configuration
    PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install -q "torch==$version"
fi
own_site="$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
printf '%s\n%s\n' "$main_site" "$PWD" >"$own_site/zz_kiln_main.pth"
printf '#!%s\nimport sys\nfrom launch.cli import main\nsys.exit(main())\n' \
    "$PWD/$venv/bin/python" >"$venv/bin/kiln"
chmod +x "$venv/bin/kiln"
"$venv/bin/python" -c "import torch; print('torch', torch.__version__, 'from', torch.__file__)"

if [ "$#" -eq 0 ]; then
    set -- tests/bench/test_gpu_smoke.py tests/pretrain/models tests/pretrain/test_plan.py \
        tests/pretrain/test_float8.py tests/pretrain/test_moe_training.py \
        tests/pretrain/test_moe_presets.py tests/pretrain/test_engines.py \
        -k "not sigkill and not another_world_size"
fi
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"

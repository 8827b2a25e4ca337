#!/usr/bin/env bash
# Wheels that ctwatch needs on a GPU machine with its own CUDA PyTorch and no internet.
#
# Downloads, for CPython 3.12 on manylinux x86-64, the wheel of every dependency of ctwatch
# (pyproject.toml's [project] dependencies, resolved transitively through each wheel's
# Requires-Dist, markers evaluated for Linux x86-64 CPython 3.12, extras skipped) that the
# machine's image does not already hold, into .whl/ (ignored by git), one version of each: the
# version installed where this runs (the one the tests passed with) when it fits, else pip's newest.
# torch is never downloaded: the image's CUDA build is the one to use. The image's package list
# below is the one the device notes give for the `nvidia-h200` kind (/work/.library/device/KINDS.md,
# read on 2026-11-17); a package in it is carried only when a known version there falls outside
# what ctwatch asks for. Fails loudly when the wheels exceed MAX_MIB (default 55 MiB: the tree and
# the wheels travel together, 64 MiB at most).
#
#   bash bench/gpu_wheels.sh            # run here, in the repository root, with pip and internet
#
# Then, on the GPU machine (the device tool's `run`, carry [".whl"], timeout_s 600):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
#       && python3 bench/gpu_check.py --out $OUT
#
# (--no-deps: every wheel needed is in .whl/ already; the image's own packages stay as they are.)
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=.whl
MAX_MIB=${MAX_MIB:-55}
PYTHON=${PYTHON:-python3}

rm -rf "$DEST"
mkdir -p "$DEST"

"$PYTHON" - "$DEST" <<'PY'
import re
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

DEST = Path(sys.argv[1])
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
TARGET = {  # the GPU machine: Python 3.12.3 (KINDS.md), Linux x86-64
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "sys_platform": "linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
# KINDS.md, "Python packages already there" (nvidia-h200, 2026-11-17)
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
httpcore httpx humanize huggingface-hub hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pyre-extensions pygments pyparsing pyproject-hooks pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp"""
PRESENT = {canonicalize_name(name) for name in IMAGE.split()}
# versions a session read there (KINDS.md's pip list row); the others are assumed to fit
KNOWN = {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
    "sentencepiece": "0.2.2", "tokenizers": "0.23.2", "torch": "2.11.0", "torchvision": "0.26.0",
    "transformers": "5.17.0", "triton": "3.6.0",
}
NEVER = {"torch"}  # the image's CUDA build, always
# Not carried (nor what only they pull in): the send-back's and the PDF report's libraries, imported
# only when a destination or a PDF report is configured, which gpu_check's daemon never is; the wheels
# would not fit beside the tree otherwise (61 MiB with them). tests/test_gpu_check.py runs the tiny
# check with these modules made unimportable, so a new import of one on gpu_check's path fails there.
NOT_CARRIED = {"weasyprint", "pynetdicom", "dicomweb-client", "highdicom"}


def requires(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        meta = Parser().parsestr(zf.read(name).decode("utf-8"))
    out = []
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(TARGET):
            out.append(req)
    return out


def wheel_version(wheel: Path) -> Version:
    return Version(wheel.name.split("-")[1])


def tested_version(req: Requirement) -> str | None:
    """The version installed here (the one the test suite ran with), when it fits ``req``."""
    try:
        here = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return None
    return here if req.specifier.contains(here, prereleases=True) else None


def download(req: Requirement) -> Path:
    here = tested_version(req)
    if here is not None:
        try:
            return _download(f"{req.name}=={here}")
        except subprocess.CalledProcessError:
            print(f"gpu_wheels: no Python 3.12 wheel of {req.name} {here} (tested here); taking {req}")
    return _download(f"{req.name}{req.specifier}")


def _download(spec: str) -> Path:
    before = set(DEST.glob("*.whl"))
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.12", "--implementation", "cp",
        *[arg for p in PLATFORMS for arg in ("--platform", p)],
        "-d", str(DEST), spec,
    ]
    subprocess.run(cmd, check=True)
    new = set(DEST.glob("*.whl")) - before
    if len(new) != 1:
        sys.exit(f"gpu_wheels: pip download of {spec} gave {sorted(p.name for p in new)}, expected one wheel")
    return new.pop()


project = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["project"]
queue = [(Requirement(line), "pyproject.toml") for line in project["dependencies"]]
queue = [(req, why) for req, why in queue if req.marker is None or req.marker.evaluate(TARGET)]
got: dict[str, Path] = {}
assumed: set[str] = set()
while queue:
    req, why = queue.pop(0)
    name = canonicalize_name(req.name)
    if name in NEVER or name in NOT_CARRIED:
        continue
    if name in PRESENT:
        known = KNOWN.get(name)
        if known is None or req.specifier.contains(known, prereleases=True):
            assumed.add(name if known is None else f"{name} {known}")
            continue
        print(f"gpu_wheels: the image's {name} {known} is outside {req} (needed by {why}): carried")
    if name in got:
        have = wheel_version(got[name])
        if not req.specifier.contains(have, prereleases=True):
            sys.exit(f"gpu_wheels: {got[name].name} does not satisfy {req} (needed by {why}); resolve by hand")
        continue
    wheel = got[name] = download(req)
    print(f"gpu_wheels: {wheel.name}  ({wheel.stat().st_size / 2**20:.1f} MiB, for {why})")
    queue.extend((dep, wheel.name.split("-")[0]) for dep in requires(wheel))
print("gpu_wheels: taken from the image: " + ", ".join(sorted(assumed)))
print("gpu_wheels: not carried (gpu_check does not use them): " + ", ".join(sorted(NOT_CARRIED)))
PY

total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
count=$(ls "$DEST"/*.whl | wc -l)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
echo "gpu_wheels: $count wheels, $(mib "$total") MiB in $DEST/; the tree that travels with them: $(mib "$tree") MiB (64 MiB at most together)"
if [ "$total" -gt $((MAX_MIB * 1048576)) ]; then
    echo "gpu_wheels: ERROR: the wheels are $(mib "$total") MiB, over the $MAX_MIB MiB allowed (MAX_MIB)." >&2
    echo "gpu_wheels: the device tool refuses a tree and carried folders over 64 MiB; carry fewer wheels." >&2
    exit 1
fi
if [ $((total + tree)) -gt $((64 * 1048576)) ]; then
    echo "gpu_wheels: ERROR: tree + wheels = $(mib $((total + tree))) MiB, over the device tool's 64 MiB." >&2
    exit 1
fi

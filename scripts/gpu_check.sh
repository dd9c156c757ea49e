#!/usr/bin/env bash
# GPU truth (issue 20): on a machine with CuPy and a CUDA GPU, and no network, run every CuPy path of
# mpidp for real and measure it; logs, JUnit XML, CSV, PNG and a summary under OUTDIR.
#
#   scripts/gpu_check.sh --fetch-wheels             # here, with network: the mpich + mpi4py wheels -> .whl/
#   scripts/gpu_check.sh OUTDIR                     # on the GPU machine (carry .whl)
#   scripts/gpu_check.sh --cpu-dry-run OUTDIR       # anywhere: the same plumbing on NumPy, tiny sizes
#
# Phases, in order, each bounded by its own limit and by --deadline for the whole run:
#   setup        venv (--system-site-packages, so the machine's CuPy/NumPy/pytest are seen) + the carried
#                wheels + `pip install --no-index --no-deps -e .`; nothing comes from the network
#   env          versions, each rank's device binding and mpidp.cuda_aware(verbose=True), at 2 ranks
#   tests1       tests/gpu tests/mpi tests/unit at 1 rank, GPU tests enabled (the xp fixture adds CuPy cases)
#   tests2       tests/mpi tests/gpu at 2 ranks sharing the GPU (mpidp's pytest plugin, one agreed report)
#   staging      pinned vs pageable host<->device copies vs mpidp's pooled staging (1 rank)
#   collectives  CuPy vs NumPy allreduce/allgather/broadcast_ sweep, raw mpi4py for reference (2 ranks)
#   train        CNN and transformer samples/s on the GPU at 1 and 2 ranks, and on the CPU at 1 rank
#   offload      OffloadManager prefetch bandwidth vs a plain pinned memcpy, share of copy time hidden
#   timeline     one traced transformer step at 2 ranks (Chrome trace + PNG)
#   rest         the rest of the suite at 1 rank (tests/process, examples: CPU-only, last, whatever time is left)
# The summary (scripts/gpu_summary.py) prints each phase, the test counts and the issue's targets as
# measured / target / met. Exit status: 0 when every phase passed and no GPU test was skipped; 1 when a
# phase failed, timed out or got no time; 2 for bad usage or a machine that cannot run it (no CuPy/GPU).
# Performance targets that are missed are reported, not failures.
set -uo pipefail

usage() {
  sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  cat <<'EOF'

Options:
  --cpu-dry-run      no GPU needed: NumPy stand-ins, tiny sizes, a few test files; no figure is a GPU result
  --deadline S       seconds for the whole run (default 460: under 8 minutes with setup)
  --python PY        interpreter the venv is made from (default: $PYTHON or python3)
  --venv DIR         venv to create, or reuse when it exists (default: $TMPDIR/mpidp-gpu-venv)
  --wheels DIR       wheels to install into the venv, offline (default: .whl)
  --only LIST        comma-separated phases to run (setup always runs)
  --skip LIST        comma-separated phases to leave out
  --bundle FILE      also pack OUTDIR into FILE (.tar.gz): the device tool brings back at most 8 files
  --fetch-wheels     download the mpich and mpi4py wheels for CPython 3.12 into --wheels, then exit
  -h, --help         this text
EOF
}

die() { echo "gpu_check: $*" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PHASES="env tests1 tests2 staging collectives train offload timeline rest"
dry=0 deadline=460 python=${PYTHON:-python3} venv=${TMPDIR:-/tmp}/mpidp-gpu-venv wheels=$ROOT/.whl
only="" skip="" bundle="" fetch=0 out=""
while (($#)); do
  case $1 in
    --cpu-dry-run) dry=1 ;;
    --deadline) deadline=${2:?--deadline needs seconds}; shift ;;
    --python) python=${2:?--python needs an interpreter}; shift ;;
    --venv) venv=${2:?--venv needs a folder}; shift ;;
    --wheels) wheels=${2:?--wheels needs a folder}; shift ;;
    --only) only=${2:?--only needs a list of phases}; shift ;;
    --skip) skip=${2:?--skip needs a list of phases}; shift ;;
    --bundle) bundle=${2:?--bundle needs a file name}; shift ;;
    --fetch-wheels) fetch=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z $out ]] || die "one OUTDIR only, got '$out' and '$1'"; out=$1 ;;
  esac
  shift
done
[[ $deadline =~ ^[0-9]+$ ]] || die "--deadline must be whole seconds, got '$deadline'"
# the phases run from the repository root: paths given relative to the caller's folder stay so
venv=$(realpath -m "$venv") wheels=$(realpath -m "$wheels")
[[ -z $bundle ]] || bundle=$(realpath -m "$bundle")
for p in ${only//,/ } ${skip//,/ }; do
  [[ " $PHASES " == *" $p "* ]] || die "unknown phase '$p'; phases are: $PHASES"
done

if ((fetch)); then
  # the device machine's Python is 3.12 and has no network; the versions are the ones the project tests with
  mkdir -p "$wheels" || die "cannot create $wheels"
  exec "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$wheels" "mpich==${MPICH_VERSION:-5.0.2}" "mpi4py==${MPI4PY_VERSION:-4.1.2}"
fi
[[ -n $out ]] || die "missing OUTDIR (usage: scripts/gpu_check.sh [options] OUTDIR; --help for more)"
command -v "$python" >/dev/null || die "no interpreter '$python' (set --python or PYTHON)"

# Fail fast and clearly where the GPU run cannot work, before any setup.
if ((!dry)); then
  why=$("$python" - <<'EOF' 2>&1
try:
    import cupy
except Exception as exc:
    raise SystemExit(f"cupy is not importable ({type(exc).__name__}: {exc})")
if not cupy.is_available():
    raise SystemExit(f"cupy {cupy.__version__} imports but sees no CUDA device")
EOF
  ) || die "$why with $python: this check needs CuPy and a CUDA GPU; --cpu-dry-run checks the plumbing without one"
fi

mkdir -p "$out"/logs "$out"/tests "$out"/bench || die "cannot create $out"
out=$(cd "$out" && pwd)
: >"$out/phases.tsv"
cd "$ROOT" || die "cannot enter $ROOT"
export PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
# an enclosing MPI job's variables would make our mpiexec join it
while read -r var; do unset "$var"; done < <(env | sed -n 's/^\(\(PMI\|PMIX\|HYDRA\|OMPI\|PRTE\)_[A-Za-z0-9_]*\)=.*/\1/p')
start=$SECONDS

wanted() {
  [[ -n $only && ",$only," != *",$1,"* ]] && return 1
  [[ ",$skip," == *",$1,"* ]] && return 1
  return 0
}

# run NAME LIMIT CMD...: CMD's output goes to logs/NAME.log; one line per phase, the log's end on failure
run() {
  local name=$1 cap=$2 left limit rc t0 status
  shift 2
  left=$((deadline - (SECONDS - start)))
  limit=$((cap < left ? cap : left))
  if ((limit < 5)); then
    printf '%s\tnotime\t0\t%s\t\n' "$name" "$cap" >>"$out/phases.tsv"
    echo "== $name: not run, the ${deadline} s deadline is used up"
    return 1
  fi
  t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$out/logs/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  printf '%s\t%s\t%s\t%s\tlogs/%s.log\n' "$name" "$status" $((SECONDS - t0)) "$limit" "$name" >>"$out/phases.tsv"
  printf '== %-12s %-8s %4d s (limit %d s)\n' "$name" "$status" $((SECONDS - t0)) "$limit"
  if [[ $status != ok ]]; then
    tail -n 25 "$out/logs/$name.log" | sed 's/^/   | /'
  fi
  return $rc
}

setup() {
  local site whl=()
  if [[ ! -x $venv/bin/python ]]; then
    "$python" -m venv --system-site-packages "$venv" || return 1
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    # where PY is itself a venv (the device's python3 is), --system-site-packages shows its base
    # interpreter's packages, not PY's: hand PY's own site-packages to the new venv
    # (addsitedir, not plain path lines, so that PY's own .pth files are read too)
    "$python" -c 'import site; print(f"import site; list(map(site.addsitedir, {site.getsitepackages()!r}))")' \
      >"$site/_mpidp_parent_site.pth" || return 1
  fi
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
  shopt -s nullglob
  whl=("$wheels"/*.whl)
  shopt -u nullglob
  if ((${#whl[@]})); then
    echo "installing ${#whl[@]} carried wheel(s) from $wheels: ${whl[*]##*/}"
    # --ignore-installed: into the venv even where the base has the same version (its mpi4py may be
    # built for another MPI, and the mpich wheel's mpiexec must sit beside the venv's python)
    "$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-installed \
      "${whl[@]}" || return 1
  else
    echo "no wheels in $wheels: using what $python already has"
  fi
  if (cd / && "$venv/bin/python" -c 'import os, sys, mpidp
sys.exit(not os.path.realpath(mpidp.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep))' "$ROOT") \
    2>/dev/null; then
    echo "mpidp is already importable from $ROOT"
  elif ! "$venv/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e .; then
    # offline, an editable install needs setuptools >= 64 and wheel already there; without them the
    # tree goes on the path (the pytest plugin is loaded with -p, not by its entry point)
    echo "note: the editable install failed (offline: setuptools >= 64 and wheel are needed); using a .pth"
    echo "$ROOT" >"$site/_mpidp_tree.pth"
  fi
  if [[ ! -x $venv/bin/mpidprun ]]; then  # the launcher tests run the mpidprun next to the interpreter
    printf '#!%s\nimport sys\nfrom mpidp.run import main\nsys.exit(main())\n' "$venv/bin/python" >"$venv/bin/mpidprun"
    chmod +x "$venv/bin/mpidprun"
  fi
  "$venv/bin/python" - <<'EOF' || return 1
import sys, numpy, mpi4py, pytest, mpidp
from mpi4py import MPI
print(f"python {sys.version.split()[0]} ({sys.executable}), numpy {numpy.__version__}, mpi4py {mpi4py.__version__}, "
      f"pytest {pytest.__version__}, mpidp {mpidp.__version__} from {mpidp.__file__}")
print("MPI:", MPI.Get_library_version().splitlines()[0].strip("\0 "))
try:
    import cupy
    print(f"cupy {cupy.__version__}, available: {cupy.is_available()}")
except ImportError as exc:
    print(f"cupy: not importable ({exc})")
EOF
  local base_bin
  base_bin=$(dirname "$(command -v "$python")")
  if [[ -x $venv/bin/mpiexec ]]; then
    mpiexec=$venv/bin/mpiexec
  elif [[ -x $base_bin/mpiexec ]]; then
    mpiexec=$base_bin/mpiexec
    echo "note: no mpiexec in the venv; using the one beside $python"
  elif mpiexec=$(command -v mpiexec); then
    echo "note: no mpiexec in the venv (carry the mpich wheel); using $mpiexec"
  else
    echo "no mpiexec: run scripts/gpu_check.sh --fetch-wheels where there is network and carry $wheels"
    return 1
  fi
  echo "mpiexec: $mpiexec"
}

mpiexec=""
t0=$SECONDS
if ! setup >"$out/logs/setup.log" 2>&1; then
  printf 'setup\tfailed\t%s\t-\tlogs/setup.log\n' $((SECONDS - t0)) >>"$out/phases.tsv"
  sed 's/^/   | /' "$out/logs/setup.log" >&2
  die "setup failed (log above, also in $out/logs/setup.log)"
fi
printf 'setup\tok\t%s\t-\tlogs/setup.log\n' $((SECONDS - t0)) >>"$out/phases.tsv"
printf '== %-12s %-8s %4d s\n' setup ok $((SECONDS - t0))
py=$venv/bin/python
bench=(scripts/bench_gpu.py --out "$out/bench")
pytest_args=(-m pytest -p pytest_timeout -p mpidp.testing -p no:cacheprovider -rfEs --color=no)
if ((dry)); then
  bench+=(--device cpu --quick)
  tests1=(tests/gpu/test_gpu_collectives.py tests/unit/test_sampler.py)
  tests2=(tests/gpu tests/mpi/test_collective_errors.py)
  rest=(tests/unit/test_hosts.py)
else
  # the dry run of this script (tests/gpu/test_gpu_check.py) proves nothing on a GPU: leave it to CI
  tests1=(tests/gpu tests/mpi tests/unit
          --deselect tests/gpu/test_gpu_check.py::test_cpu_dry_run_writes_the_layout_and_a_bundle)
  tests2=(tests/mpi tests/gpu)
  rest=(tests/process examples)
fi

! wanted env || run env 60 "$mpiexec" -n 2 "$py" "${bench[@]}" env
! wanted tests1 || run tests1 200 "$py" "${pytest_args[@]}" -o timeout=120 \
  --junitxml="$out/tests/tests1.xml" "${tests1[@]}"
! wanted tests2 || run tests2 200 "$mpiexec" -n 2 "$py" "${pytest_args[@]}" --mpidp --mpidp-timeout 120 \
  -o timeout=150 --junitxml="$out/tests/tests2.xml" "${tests2[@]}"
! wanted staging || run staging 45 "$py" "${bench[@]}" staging
! wanted collectives || run collectives 75 "$mpiexec" -n 2 "$py" "${bench[@]}" collectives
if wanted train; then
  if ((dry)); then
    run train 60 "$mpiexec" -n 2 "$py" "${bench[@]}" train
  else  # GPU at 1 and 2 ranks, then the same models on the CPU at 1 rank for scale
    # shellcheck disable=SC2016  # the inner script expands its own arguments
    run train 150 bash -c 'm=$1; shift; "$m" -n 1 "$@" train && "$m" -n 2 "$@" train &&
      "$m" -n 1 "$@" train --device cpu --budget 6' _ "$mpiexec" "$py" "${bench[@]}"
  fi
fi
! wanted offload || run offload 60 "$py" "${bench[@]}" offload
! wanted timeline || run timeline 45 "$mpiexec" -n 2 "$py" "${bench[@]}" timeline
! wanted rest || run rest 600 "$py" "${pytest_args[@]}" --junitxml="$out/tests/rest.xml" "${rest[@]}"

summary=(scripts/gpu_summary.py "$out")
((dry)) && summary+=(--dry-run)
"$py" "${summary[@]}" --seconds $((SECONDS - start))
rc=$?
if [[ -n $bundle ]]; then
  tar -czf "$bundle" -C "$(dirname "$out")" "$(basename "$out")" && echo "bundle: $bundle ($(du -h "$bundle" | cut -f1))"
fi
exit $rc

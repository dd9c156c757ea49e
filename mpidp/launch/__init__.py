"""The ``mpidprun`` launcher: host lists, the mpiexec/srun command line, restarts.

Nothing in this package initialises MPI; the MPI flavour is read in a
subprocess (``mpiexec.probe_mpi4py``).
"""
from .cli import build_parser, latest_checkpoint_step, main, plan, run, with_resume
from .hosts import (Host, expand_slurm_nodelist, expand_slurm_tasks_per_node, from_environment,
                    from_slurm, parse_host_list, parse_hostfile, read_hostfile, read_pbs_nodefile)
from .mpiexec import Command, build_command, find_mpiexec, probe_mpi4py

__all__ = ["Host", "Command", "build_parser", "build_command", "expand_slurm_nodelist",
           "expand_slurm_tasks_per_node", "find_mpiexec", "from_environment", "from_slurm", "main",
           "parse_host_list", "parse_hostfile", "plan", "probe_mpi4py", "read_hostfile",
           "read_pbs_nodefile", "run", "latest_checkpoint_step", "with_resume"]

#!/bin/sh
# TaskProlog of the local test clusters (jobs/local-slurm.sh, jobs/emulated-cluster.sh):
# slurmstepd runs it before each task and sets every "export NAME=VALUE" it prints.
#
# Why: pip's MPICH over UCX publishes its ~9 KB worker address through PMI-1 `put`
# lines of up to ~1080 bytes, and SLURM 22.05's pmi2 server reads a PMI-1 request
# with a single 1024-byte read() (src/plugins/mpi/pmi2, handle_pmi1_cmd: "TODO: read
# until newline").  When a line is longer -- it depends on the address bytes, so it
# comes and goes -- the request is cut in two, slurmstepd logs "mpi/pmi2: invalid
# client request", and MPI_Init fails on every rank.  MPICH's OFI netmod with the tcp
# provider publishes a short address: its one put line is under 100 bytes.  A user's own
# choice (either variable already set) is kept.
[ -n "${MPIR_CVAR_CH4_NETMOD:-}" ] || echo "export MPIR_CVAR_CH4_NETMOD=ofi"
[ -n "${FI_PROVIDER:-}" ] || echo "export FI_PROVIDER=tcp"
exit 0

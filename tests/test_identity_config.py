"""Rank identity from launcher environments, and the configuration order."""

import pytest

from provhpc.launch import config, identity


@pytest.mark.parametrize("env, expect", [
    ({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
     (3, 4, 1, 2, "hydra")),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"},
     (5, 8, 1, 4, "openmpi")),
    ({"SLURM_PROCID": "4", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "6", "SLURM_LOCALID": "0",
      "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x3)", "SLURM_JOB_ID": "77"},
     (4, 6, 0, 2, "srun")),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
     (1, 2, 1, 2, "torchrun")),
    ({}, (0, 1, 0, 1, "none")),
])
def test_identity_from_each_launcher(env, expect):
    ident = identity.detect(env)
    assert (ident.rank, ident.size, ident.local_rank, ident.local_size, ident.launcher) == expect


def test_hydra_inside_a_slurm_allocation_is_hydra():
    env = {"SLURM_JOB_ID": "9", "SLURM_NTASKS": "6", "PMI_RANK": "2", "PMI_SIZE": "4",
           "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "4"}
    ident = identity.detect(env)
    assert ident.launcher == "hydra" and ident.size == 4 and ident.job_id == "9"


def test_slurm_tasks_per_node_syntax():
    assert identity.slurm_tasks_on_node("2(x3),1", 2) == 2
    assert identity.slurm_tasks_on_node("2(x3),1", 3) == 1
    assert identity.slurm_tasks_on_node("4", 0) == 4
    assert identity.slurm_tasks_on_node("bogus", 0) is None


def test_simulated_nodes_are_contiguous_blocks():
    base = identity.Identity(rank=0, size=5, local_rank=0, local_size=5, node="h", host="h")
    blocks = [identity.simulate(identity.Identity(**{**base.to_dict(), "rank": r,
                                                     "local_rank": r}), 2) for r in range(5)]
    assert [b.node for b in blocks] == ["h-sim0"] * 3 + ["h-sim1"] * 2
    assert [b.local_rank for b in blocks] == [0, 1, 2, 0, 1]
    assert [b.local_size for b in blocks] == [3, 3, 3, 2, 2]


def test_argument_then_environment_then_default():
    env = {"PROVHPC_FLUSH_INTERVAL": "0.25", "PROVHPC_SLOTS": "4"}
    cfg = config.load(env, slots=16)
    assert cfg.slots == 16 and cfg.sources["slots"] == "argument"
    assert cfg.flush_interval == 0.25 and cfg.sources["flush_interval"] == "environment"
    assert cfg.slot_records == 4096 and cfg.sources["slot_records"] == "default"


def test_bad_environment_warns_and_falls_back_bad_argument_raises():
    with pytest.warns(RuntimeWarning, match="PROVHPC_SLOTS"):
        cfg = config.load({"PROVHPC_SLOTS": "-3"})
    assert cfg.slots == 8
    with pytest.raises(ValueError, match="slots"):
        config.load({}, slots=0)
    with pytest.raises(ValueError, match="unknown"):
        config.load({}, slotz=3)


def test_config_round_trips_through_the_environment():
    cfg = config.load({}, flush_interval=0.3, external_aggregator=True)
    again = config.load(config.to_environ(cfg))
    assert again.to_dict() == cfg.to_dict()

"""The placement group's lifetime: removed with the run on a Ray that outlives it, left to Ray's
shutdown on the private Ray the run started for itself."""
from __future__ import annotations

from types import SimpleNamespace

from switchkd.cluster.placement import Bundle, PlacementPlan, placement_group_for, ray_session
from switchkd.rollout.local_ray import init_ray


def test_the_group_is_removed_on_a_ray_the_run_did_not_start():
    import ray
    from ray.util import placement_group_table
    from ray.util.placement_group import remove_placement_group

    cluster = SimpleNamespace(address=None, num_cpus=1, num_gpus=0, placement_timeout_s=60)
    plan = PlacementPlan([Bundle("trainer rank 0", {"CPU": 1.0}, "")], "PACK", "cpu")
    init_ray(num_cpus=1, log_to_driver=False)   # the caller's session, as in a notebook
    try:
        with ray_session(cluster, plan) as private:
            assert private is False
            with placement_group_for(plan, cluster, private) as pg:
                assert placement_group_table(pg)["state"] == "CREATED"
            assert placement_group_table(pg)["state"] == "REMOVED"   # its CPU is free for the next run
            with placement_group_for(plan, cluster, private_ray=True) as kept:
                pass
            assert placement_group_table(kept)["state"] == "CREATED"
            remove_placement_group(kept)
        assert ray.is_initialized(), "the caller's session is theirs to stop"
    finally:
        ray.shutdown()

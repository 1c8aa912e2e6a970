"""The pre-flight planner reads a live Ray cluster's nodes."""

from __future__ import annotations


import pytest

from tests.conftest import aero

GiB = 2**30


@pytest.mark.slow
def test_plan_reads_a_live_cluster(ray_cluster):
    out = aero("plan", "configs/tiny-cpu.yaml", "--address", ray_cluster["address"], "--json")
    assert out.returncode == 0, out.stderr
    import json

    plan = json.loads(out.stdout)
    assert plan["capacity"]["source"] == "the live Ray cluster" and plan["problems"] == []
    assert plan["capacity"]["nodes"][0]["cpus"] == 2 and plan["capacity"]["nodes"][0]["ram_bytes"] > GiB


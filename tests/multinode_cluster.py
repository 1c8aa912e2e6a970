"""A real Ray cluster of a head and worker nodes on this one machine, for the node-failure tests.

Ray's own `ray.cluster_utils.Cluster` starts each node's processes (raylet, object store,
agents) on free ports, as separate nodes of one cluster; this program holds it so the test
process (already joined to the session's cluster) can drive it over stdin/stdout, one JSON
line per command:

    python tests/multinode_cluster.py '{"head": {"num_cpus": 0}, "workers": {"a": {"num_cpus": 2}}}'
    -> {"address": "127.0.0.1:PORT", "nodes": {"head": {...}, "a": {"node_id": ..., "raylet_pid": ...}}}
    kill a   -> the node's processes SIGKILLed, as a lost machine     -> {"killed": "a"}
    add c a  -> a new node c with worker a's resources (an autoscaler's replacement)
    quit     (or end of input) -> the cluster is shut down
"""

from __future__ import annotations

import json
import sys


def _info(node) -> dict:
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
    return {"node_id": node.node_id, "raylet_pid": raylet.pid}


def main() -> None:
    from ray.cluster_utils import Cluster

    spec = json.loads(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"object_store_memory": 300 << 20, **spec["head"]})
    nodes = {name: cluster.add_node(object_store_memory=200 << 20, **args) for name, args in spec["workers"].items()}
    cluster.wait_for_nodes()
    reply = {"address": cluster.address, "nodes": {"head": _info(cluster.head_node),
                                                   **{n: _info(node) for n, node in nodes.items()}}}
    print(json.dumps(reply), flush=True)
    try:
        for line in sys.stdin:
            command, name, *template = line.split() + [""]
            if command == "kill":
                cluster.remove_node(nodes.pop(name), allow_graceful=False)
                print(json.dumps({"killed": name}), flush=True)
            elif command == "add":
                args = spec["workers"][template[0]]
                nodes[name] = cluster.add_node(object_store_memory=200 << 20, **args)
                cluster.wait_for_nodes()
                print(json.dumps({"added": name, **_info(nodes[name])}), flush=True)
            elif command == "quit":
                break
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()

"""A Ray driver that kills Serve replicas on request, for the fault tests.

It runs in its own process: Ray reads RAY_AUTH_MODE when it is imported, and the stack's
cluster wants token auth, which the pytest process (which may start Ray clusters of its own
later) should not be switched to. Usage:

    RAY_AUTH_MODE=token python -m tests.e2e.replica_killer <ray address>

It prints `ready` once connected; then each line read from stdin names a Serve deployment,
whose replicas are killed with `ray.kill` (as a node loss or an OOM kill would end them); it
answers with the number it killed.
"""

from __future__ import annotations

import sys

import ray


def replica_names(deployment: str) -> list[str]:
    return [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in actor["name"]
    ]


def main(address: str) -> None:
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    print("ready", flush=True)
    for line in sys.stdin:
        names = replica_names(line.strip())
        for name in names:
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        print(len(names), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

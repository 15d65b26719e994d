"""Where a worker listens (issue 19, item 6): on this machine only, unless told otherwise; in a
pod on the pod's addresses (probes, Services, kubectl port-forward), with rank 0's rendezvous
store on the pod's IP only. `tests/worker/test_launcher.py` checks a real `moe-worker serve`'s
ports; the operator's side (MOE_POD_IP from the downward API) is in tests/operator."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch.distributed as dist

from moe_contract import env
from moe_worker.ep.group import _listener
from moe_worker.launcher import LocalRanks, listening_ports, rank_settings
from moe_worker.settings import WorkerSettings, settings_from_env
from tests.worker.worker_harness import free_port, listening


def test_outside_a_pod_everything_listens_on_loopback_unless_bind_says_otherwise() -> None:
    local = settings_from_env({})
    assert local.bind_address == local.store_address == "127.0.0.1"
    ranks = [rank_settings(local.replace(world_size=2), LocalRanks(2), r) for r in range(2)]
    assert {address for address, _, _ in listening_ports(local, ranks)} == {"127.0.0.1"}
    told = settings_from_env({env.BIND_ADDRESS: "0.0.0.0"})
    assert told.bind_address == told.store_address == "0.0.0.0"


def test_a_pod_listens_on_its_addresses_and_its_store_on_its_ip_only() -> None:
    pod = settings_from_env({env.POD_NAME: "m-0", env.POD_IP: "10.1.2.3"})
    assert (pod.bind_address, pod.store_address) == ("0.0.0.0", "10.1.2.3")
    ranks = [rank_settings(pod.replace(world_size=2), LocalRanks(2), r) for r in range(2)]
    ports = {what: address for address, _, what in listening_ports(pod, ranks)}
    assert ports["the group's rendezvous port"] == "10.1.2.3"
    assert ports["rank 0's control port"] == ports["the OpenAI API port"] == "0.0.0.0"
    # The local cluster's node agent gives each pod its own address: that one, wherever named.
    node = settings_from_env({env.POD_NAME: "m-0", env.BIND_ADDRESS: "127.0.4.2"})
    assert node.bind_address == node.store_address == "127.0.4.2"
    assert WorkerSettings(pod_ip="127.0.4.2", bind_address="0.0.0.0").store_address == "127.0.4.2"


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.7"])
def test_the_rendezvous_store_listens_where_it_is_told_only(address: str) -> None:
    """The store rank 0 starts (group.join's listener): on the pod's IP, nothing else of the
    machine answers on its port (before: torch's store took the port on every address)."""
    port = free_port(address)
    store = dist.TCPStore(
        address,
        port,
        1,
        is_master=True,
        timeout=timedelta(seconds=5),
        wait_for_workers=False,
        master_listen_fd=_listener(address, port),
    )
    try:
        store.set("k", "v")
        assert listening(port) == {address}
        other = "127.0.0.8" if address != "127.0.0.8" else "127.0.0.9"
        with pytest.raises(ConnectionRefusedError), socket.create_connection((other, port), 2):
            pass
    finally:
        del store

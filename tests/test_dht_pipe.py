"""hivemind's DHT process reads its commands from a pipe it leaves non-blocking (uvloop's add_reader):
a command longer than one pipe write, caught half-arrived, used to kill that process (hivemind PR
#660). A real DHT process with p2pd takes commands far over the pipe's 64 KiB buffer, stays alive,
and keeps answering."""

import os

import pytest
from hivemind.utils import get_dht_time

from node.swarm.membership import WholeMessageDHT

pytestmark = pytest.mark.timeout(120)


def test_commands_far_over_the_pipe_buffer_reach_the_dht_process_whole():
    dht = WholeMessageDHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False)
    try:
        for round_ in range(12):  # a 1 MiB value: sixteen pipe buffers, arriving while the process reads
            value = os.urandom(1 << 20)
            assert dht.store(f"big-{round_}", value, get_dht_time() + 60, return_future=True).result(30) is not None
        assert dht.is_alive()
        assert dht.store("small", b"answer", get_dht_time() + 60)
        found = dht.get("small", latest=True, return_future=True).result(30)
        assert found is not None and found.value == b"answer"
        assert dht.get("big-11", latest=True, return_future=True).result(30).value == value
    finally:
        dht.shutdown()

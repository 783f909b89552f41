"""Test-session settings shared by every test module."""

import torch

# The suite runs on 2 shared cores beside other processes: torch at 2 intra-op threads then spins
# against them and ran the ddm_models tests ~15x slower (152 s vs 9.5 s for test_training.py).
torch.set_num_threads(1)

# Files that start swarms of peer processes, the longest first (their times under `make test`).
# `make test` runs files in this order (`--no-loadscope-reorder`: xdist would otherwise put the files
# with the most tests first, which left these few-test, minute-long files for the end, one of them
# running alone while the other worker had nothing left); every other file follows, in name order.
LONGEST_FIRST = ("test_swarm_e2e.py", "test_audits_e2e.py", "test_adversaries.py", "test_own_data_e2e.py",
                 "test_multi_rank_node.py", "test_nat.py", "test_network_faults.py", "test_crash_safety.py",
                 "test_init_from.py", "test_multi_host.py", "test_status_web.py", "test_peer_cache.py",
                 "test_candidate_fakes.py", "test_latent_swarm.py", "test_bad_files.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order

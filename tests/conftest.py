"""Test-session settings shared by every test module."""

import torch

# The suite runs on 2 shared cores beside other processes: torch at 2 intra-op threads then spins
# against them and ran the ddm_models tests ~15x slower (152 s vs 9.5 s for test_training.py).
torch.set_num_threads(1)

# The files that take longest, longest first (under `make test`: 287 s down to 30 s, of the 1,800 s
# all files took; 928 s on two workers), then every other file in name order. `make test` hands files
# out in this order (`--no-loadscope-reorder`): xdist's own order, the files with most tests first,
# left these few-test, minute-long files for the end, one running alone while the other worker idled.
LONGEST_FIRST = ("test_swarm_e2e.py", "test_audits_e2e.py", "test_adversaries.py", "test_bad_input.py",
                 "test_multi_rank_node.py", "test_init_from.py", "test_network_faults.py", "test_bad_files.py",
                 "test_own_data_e2e.py", "test_multi_host.py", "test_candidate_fakes.py", "test_nat.py",
                 "test_peer_cache.py", "test_crash_safety.py", "test_fetch_attacks.py", "test_swarm_dht.py",
                 "test_blob_transfer.py", "test_status_web.py", "test_latent_swarm.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order

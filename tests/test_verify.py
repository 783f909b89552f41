"""`generate --verify` measures what a checkpoint claims: an expert's held-out loss and the router's
held-out accuracy, with seeded noise and times; a checkpoint much worse than its claim is refused."""

import pytest
import torch

from ddm_models.evaluation import router_accuracy
from node.checkpoints.acceptance import Refused
from node.generator.assembly import verify_router
from tests.ml_fixtures import random_router, small_digits, text_encoder


def _heldout(router):
    data = small_digits()
    return data, data.labels % router.config.num_clusters


def test_router_accuracy_is_deterministic_for_a_seed():
    router = random_router()
    data, clusters = _heldout(router)
    first = router_accuracy(router, data, clusters, text_encoder(), max_images=256)
    assert first == router_accuracy(router, data, clusters, text_encoder(), max_images=256)
    assert 0.0 <= first <= 1.0


def test_a_router_much_worse_than_its_claimed_accuracy_is_refused_and_an_honest_claim_accepted():
    torch.set_num_threads(1)
    router = random_router()
    data, clusters = _heldout(router)
    measured = router_accuracy(router, data, clusters, text_encoder(), max_images=256)
    assert measured < 0.6  # untrained: near chance
    with pytest.raises(Refused, match="accuracy"):
        verify_router(router, 0.99, (data, clusters), text_encoder(), max_images=256)
    assert verify_router(router, measured, (data, clusters), text_encoder(), max_images=256) == measured

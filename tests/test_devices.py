"""GPU by default: device resolution, SDPA attention, the trainer's compile flag (on CPU)."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from ddm_models.devices import UnknownDevice, inference_dtype, resolve_device
from ddm_models.experts import build_expert
from ddm_models.router import build_router
from ddm_models.configs import router_config
from ddm_models.training import ExpertTrainer
from tests.ml_fixtures import small_digits, text_encoder, tiny_config


def test_auto_is_cuda_when_present_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu_says_so():
    with pytest.raises(UnknownDevice, match="no CUDA GPU"):
        resolve_device("cuda:0")


def test_a_misspelt_device_is_refused_naming_the_choices():
    with pytest.raises(UnknownDevice, match="'auto', 'cpu'"):
        resolve_device("gpu")


def test_generation_runs_bf16_on_cuda_and_float32_on_cpu():
    assert inference_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert inference_dtype(torch.device("cpu")) == torch.float32


def test_every_attention_of_experts_and_the_dit_router_is_scaled_dot_product_attention():
    models = [build_expert(tiny_config()), build_router(router_config("DiT-S/2", width=32, depth=1, heads=2))]
    # tiny_config has 2 blocks (self- and cross-attention each), the router 1 (self-attention)
    processors = [m.processor for model in models for m in model.modules() if hasattr(m, "processor")]
    assert len(processors) == 2 * 2 + 1 and all(isinstance(p, AttnProcessor2_0) for p in processors)


def test_a_compiled_trainer_takes_the_same_steps_as_an_eager_one():
    def losses(compile_model):
        trainer = ExpertTrainer(tiny_config(), small_digits(), text_encoder(), batch_size=16, warmup_steps=1,
                                compile_model=compile_model)
        return trainer.train_steps(3).losses
    # the "eager" backend traces with dynamo but runs the captured graph as is: a CPU-cheap check
    # that the expert compiles (inductor, the default backend, is what pays on a GPU)
    assert losses("eager") == pytest.approx(losses(False), rel=1e-5)

"""The Python API takes the command line's one path: the same checks, the same memory plan, the same sentences."""
import re

import pytest
import torch

from wan_opt import WanOptPipeline
from wan_opt.errors import WanOptError

NO_GPU = not torch.cuda.is_available()


@pytest.mark.parametrize("kwargs, says", [
    ({"model": "wan99"}, "Could not find 'model/wan99': choose one of"),
    ({"model": "tiny", "hardware": "h1000"}, "Could not find 'hardware/h1000': choose one of"),
    ({"model": "wan22_t2v_a14b"}, "model=wan22_t2v_a14b needs its weights: pass model.ckpt_dir="),
    ({"model": "wan22_t2v_a14b", "ckpt_dir": "/nonexistent/Wan2.2-T2V-A14B"}, "/nonexistent/Wan2.2-T2V-A14B"),
    ({"model": "tiny", "overrides": ["hardware.memory.experts=everywhere"]},
     "hardware.memory.experts=everywhere is not one of: resident, swap, offload."),
    ({"model": "tiny", "overrides": ["hardware.memroy.experts=swap"]}, "There is no setting 'hardware.memroy'"),
    ({"model": "tiny", "overrides": ["frames=10"]}, "frames=10 is not of the form 4n+1"),
    ({"model": "tiny", "overrides": ["hardware.speed.fp8_matmul=true"]},
     "hardware.speed.fp8_matmul multiplies fp8-stored weights"),
    ({"model": "wan22_t2v_a14b_lightning", "overrides": ["model.random_weights=true"]},
     "runs with a step-distilled LoRA per expert"),
])
def test_a_bad_request_through_the_api_is_the_command_lines_sentence(kwargs, says):
    with pytest.raises(WanOptError, match=re.escape(says)):
        WanOptPipeline.from_pretrained(**{"hardware": "cpu", **kwargs})


@pytest.mark.skipif(not NO_GPU, reason="checks what a machine without a GPU is told")
def test_a_gpu_profile_on_a_machine_without_one_is_refused_before_loading():
    with pytest.raises(WanOptError, match="needs a CUDA GPU and none is visible"):
        WanOptPipeline.from_pretrained(model="tiny", hardware="h100")


def test_the_api_loads_as_its_plan_says_and_generates():
    pipe = WanOptPipeline.from_pretrained(model="tiny", hardware="cpu", overrides=["hardware.memory.vae_tiling=true"])
    prepared = pipe.prepared
    assert prepared.plan.fits and prepared.decided["vae_tiling"] == "user"
    assert prepared.cfg.hardware.memory.vae_tiling is True and pipe.memory.vae_tiling is True
    assert pipe.memory.text_encoder == prepared.plan.mechanisms["text_encoder"]
    out = pipe("a red fox", height=64, width=64, num_frames=5, num_inference_steps=1,
               generator=torch.Generator().manual_seed(0))
    assert out.frames.shape == (1, 5, 64, 64, 3)


def test_the_api_leaves_the_config_it_was_given_alone():
    from omegaconf import OmegaConf

    from wan_opt.prepare import compose_config, prepare

    cfg = compose_config(["model=tiny", "prompt=a fox", "hardware.memory.experts=swap"], hardware="cpu")
    before = OmegaConf.to_container(cfg)
    prepared = prepare(cfg, ["hardware.memory.experts=swap"])
    assert OmegaConf.to_container(cfg) == before and prepared.cfg is not cfg
    assert OmegaConf.is_readonly(prepared.cfg)

"""fuse_gelu: the feed-forward's GELU in its first matmul (wan_opt.optim.ffn)."""
import pytest
import torch
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward

from wan_opt.loading.tiny import build_tiny_components
from wan_opt.optim.ffn import GeluMatmul, fuse_gelu
from wan_opt.optim.fp8 import quantize_linears, use_fp8_matmul
from wan_opt.optim.speed import SpeedPolicy


def wan_ffn(dim: int = 32, inner: int = 96, seed: int = 0) -> FeedForward:
    torch.manual_seed(seed)
    return FeedForward(dim, inner_dim=inner, activation_fn="gelu-approximate").eval()


def test_fused_layer_keeps_the_weights_and_on_a_cpu_diffusers_arithmetic():
    ff = wan_ffn()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        before = ff(x)
        proj = ff.net[0].proj
        assert fuse_gelu(ff) == 1
        assert isinstance(ff.net[0], GeluMatmul) and ff.net[0].proj is proj  # same layer, same state-dict names
        assert "net.0.proj.weight" in ff.state_dict()
        assert torch.equal(ff(x), before)
    assert fuse_gelu(ff) == 0  # once is all


def test_only_wan_s_plain_tanh_feed_forwards_are_fused():
    exact = FeedForward(32, inner_dim=96, activation_fn="gelu")  # GELU without the tanh approximation
    fp8 = wan_ffn()
    quantize_linears(fp8)
    hooked = wan_ffn()
    hooked.net[0].proj.register_forward_pre_hook(lambda module, args: None)  # e.g. leaf-level offloading
    assert [fuse_gelu(m) for m in (exact, fp8, hooked)] == [0, 0, 0]
    assert type(hooked.net[0]) is GELU


def test_fp8_matmuls_keep_their_own_gelu_placement():
    """With fp8 matmuls the GELU is already in the output layer's quantisation: the knob leaves it there."""
    ff = wan_ffn()
    quantize_linears(ff)
    use_fp8_matmul(ff)
    assert fuse_gelu(ff) == 0 and ff.net[2].input_gelu


def test_the_knob_fuses_only_on_a_gpu_run():
    experts = [build_tiny_components(seed=1)["transformer"]]
    SpeedPolicy(fuse_gelu=True).apply(experts, torch.device("cpu"))  # on a CPU PyTorch's defaults stand
    assert not any(isinstance(m, GeluMatmul) for m in experts[0].modules())
    assert fuse_gelu(experts[0]) == len(experts[0].blocks)  # every block's feed-forward is Wan's


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_epilogue_matches_diffusers_gelu_on_a_gpu_eager_and_compiled(dtype):
    ff = wan_ffn(dim=256, inner=1024).to("cuda", dtype)
    x = torch.randn(3, 500, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        reference = ff.net[0](x).float()
        fuse_gelu(ff)
        eager = ff.net[0](x)
        compiled = torch.compile(ff.net[0], fullgraph=True)(x)
    bound = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: within its rounding, one rounding fewer
    for out in (eager, compiled):
        assert out.dtype == dtype and out.shape == reference.shape
        assert ((out.float() - reference).norm() / reference.norm()).item() < bound

"""wan-opt's exact attention kernel for Hopper (`hardware.speed.attention=hopper`): bf16 Q K^T and P V in the
warp-specialised Gluon kernel that also runs mode=fast's attention.

Gluon has no CPU interpreter: here the kernel is compiled for sm_90 (its layouts, instructions, shared memory and
registers), its operands' layout is checked, and its processor and config are tested with SDPA standing in for
it; tests/test_gpu.py runs it against exact attention on a Hopper GPU.
"""
import os

import pytest
import torch
from diffusers import WanTransformer3DModel

from tests.sm90 import OTHER_TRITONS, SHARED_MEMORY, compile_gluon_attention
from tests.test_pipeline import rel_l2
from wan_opt.checks import check_attention_library
from wan_opt.errors import WanOptError
from wan_opt.optim import attention
from wan_opt.optim.speed import WAN_OPT_PROCESSORS, attention_backend


def sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


@pytest.mark.parametrize("schedule", ["turns", "overlap", "turns+overlap"])
@pytest.mark.parametrize("triton_path", [None, *OTHER_TRITONS], ids=["installed", *OTHER_TRITONS])
def test_the_exact_kernel_compiles_for_hopper_without_a_gpu(triton_path, schedule):
    """Both MMAs on bf16 operands (P from the S accumulator's registers as they are: assert_trivial), within
    Hopper's shared memory (three stages of bf16 K and V beside Q, and the turns' two barriers), without register
    spills, in every schedule; in "turns+overlap" a block's exponentials (128 a thread: 64 a row) run after the
    wait for the scores and before the wait for the previous block's P V, which ptxas would otherwise hoist."""
    report = compile_gluon_attention("bf16", triton_path, schedule)
    assert report["wgmma"] == ["m64n128k16.f32.bf16.bf16"], report
    assert report["shared"] <= SHARED_MEMORY and report["spills"] == 0, report
    if schedule == "turns+overlap":
        assert report["exponentials_between_waits"] >= 64, report


@pytest.fixture
def schedule_step(monkeypatch):
    """benchmarks/schedule_step.py as a module, imported afresh."""
    import sys

    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper", reason="needs a Triton with Gluon")
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    sys.modules.pop("schedule_step", None)
    import schedule_step

    return schedule_step


@pytest.mark.parametrize("overrides, expected", [([], "bf16"), (["mode=fast"], "int8"),
                                                  (["hardware.speed.attention=hopper"], "bf16")])
def test_the_schedule_benchmark_switches_the_kernel_its_profile_runs(overrides, expected, schedule_step):
    """benchmarks/schedule_step.py sets attention_hopper.SCHEDULE for the P V type its profile's attention runs:
    the exact kernel's in the lossless profiles, the int8 P V kernel's in mode=fast."""
    from wan_opt.prepare import compose_config

    cfg = compose_config(["model=wan22_t2v_a14b", *overrides], hardware="h100")
    assert schedule_step.pv_type(cfg, (9, 0), {"hopper"}) == expected


@pytest.mark.parametrize("overrides, installed", [([], {"flash4", "hopper"}), (["mode=fast"], set()),
                                                  (["hardware.speed.attention=cudnn"], {"hopper"})])
def test_the_schedule_benchmark_refuses_a_profile_that_does_not_run_the_hopper_kernel(overrides, installed,
                                                                                      schedule_step):
    """auto on FlashAttention-4, a kernel named, or no Gluon kernel to run: the schedules would change nothing, so
    the benchmark says so instead of timing the same kernel under different names."""
    from wan_opt.prepare import compose_config

    cfg = compose_config(["model=wan22_t2v_a14b", *overrides], hardware="h100")
    with pytest.raises(WanOptError, match="not wan-opt's Hopper kernel, so its schedules change nothing"):
        schedule_step.pv_type(cfg, (9, 0), installed)


@pytest.mark.parametrize("env, expected", [
    ({}, {"bf16": "turns", "int8": "turns"}),
    ({"WAN_OPT_HOPPER_SCHEDULE": "overlap"}, {"bf16": "overlap", "int8": "overlap"}),
    ({"WAN_OPT_HOPPER_SCHEDULE": "turns+overlap"}, {"bf16": "turns+overlap", "int8": "turns"}),  # bf16's alone
    ({"WAN_OPT_HOPPER_PINGPONG": "0"}, {"bf16": "overlap", "int8": "overlap"}),  # earlier result files' spelling
    ({"WAN_OPT_HOPPER_PINGPONG": "1"}, {"bf16": "turns", "int8": "turns"}),
    ({"WAN_OPT_HOPPER_PINGPONG": "yes"}, {"bf16": "turns", "int8": "turns"}),  # not a switch's value: defaults
])
def test_schedules_follow_p_v_type_unless_the_environment_names_one(env, expected):
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper", reason="needs a Triton with Gluon")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WAN_OPT_HOPPER_")} | env
    done = subprocess.run([sys.executable, "-c", "import json; from wan_opt.kernels import attention_hopper as h; "
                           "print(json.dumps(h.SCHEDULE))"], env=environ, capture_output=True, text=True,
                          check=True)
    assert json.loads(done.stdout) == expected


def test_a_schedule_that_does_not_exist_is_refused_by_name():
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper", reason="needs a Triton with Gluon")
    from wan_opt.kernels.attention_hopper import schedule_from_env

    with pytest.raises(WanOptError, match="WAN_OPT_HOPPER_SCHEDULE=pingpong is not a schedule: use one of overlap"):
        schedule_from_env({"WAN_OPT_HOPPER_SCHEDULE": "pingpong"})
    assert schedule_from_env({}) is None


def test_a_schedule_the_kernel_does_not_have_is_refused_by_name():
    """turns+overlap is the exact kernel's alone: the int8 P V kernel (mode=fast) refuses it with a sentence, as a
    launch and benchmarks/schedule_step.py ask it to."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper", reason="needs a Triton with Gluon")
    from wan_opt.kernels.attention_hopper import check_schedule

    with pytest.raises(WanOptError, match="the int8 P V kernel has no schedule turns\\+overlap: use one of overlap, "
                                          "turns."):
        check_schedule("int8", "turns+overlap")
    check_schedule("bf16", "turns+overlap")


def test_the_kernel_reads_q_k_and_v_where_diffusers_leaves_them():
    """(B, N, H, D) rows as one (B*N, H*D) matrix: a view of a contiguous tensor or of a fused QKV projection's
    output, a copy only where TMA cannot read the layout."""
    from wan_opt.kernels.attention_hopper import as_rows

    x = torch.randn(2, 5, 3, 16, dtype=torch.bfloat16)
    rows = as_rows(x)
    assert rows.data_ptr() == x.data_ptr() and torch.equal(rows, x.reshape(10, 48))
    qkv = torch.randn(2, 5, 3 * 48, dtype=torch.bfloat16)  # a fused projection: Q, K and V side by side
    for i in range(3):
        part = qkv[..., 48 * i:48 * (i + 1)].unflatten(2, (3, 16))
        rows = as_rows(part)
        assert rows.data_ptr() == part.data_ptr() and rows.stride() == (144, 1)
        assert torch.equal(rows, part.reshape(10, 48))
    one = torch.randn(5, 1, 3, 16, dtype=torch.bfloat16).transpose(0, 1)  # one sequence: its batch stride is moot
    assert as_rows(one).data_ptr() == one.data_ptr() and torch.equal(as_rows(one), one.reshape(5, 48))
    heads_first = torch.randn(2, 3, 5, 16, dtype=torch.bfloat16).transpose(1, 2)  # heads not packed in a token
    rows = as_rows(heads_first)
    assert rows.data_ptr() != heads_first.data_ptr() and torch.equal(rows, heads_first.reshape(10, 48))


TINY_128 = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


@pytest.mark.parametrize("head_dim", [128, 64])
def test_the_processor_hands_the_kernel_what_sdpa_would_get(monkeypatch, head_dim):
    """SDPA stands in for the kernel: the forward then equals diffusers' own, with every self-attention of head
    dimension 128 on the kernel and the rest (cross-attention, other head dimensions) on diffusers' processor."""
    torch.manual_seed(3)
    model = WanTransformer3DModel(**{**TINY_128, "attention_head_dim": head_dim}).eval()
    x, t, ctx = torch.randn(1, 16, 3, 8, 12), torch.tensor([700.0]), torch.randn(1, 16, 32)
    calls = []
    monkeypatch.setattr(attention, "exact_attention_hopper", lambda q, k, v: calls.append(q.shape) or sdpa(q, k, v))
    with torch.no_grad():
        reference = model(x, t, ctx, return_dict=False)[0]
        assert attention.use_self_attention(model, WAN_OPT_PROCESSORS["hopper"]) == 2
        out = model(x, t, ctx, return_dict=False)[0]
    assert calls == ([(1, 72, 2, 128)] * 2 if head_dim == 128 else [])
    assert rel_l2(out, reference) < 1e-5


def test_the_kernel_op_has_a_shape_for_compile():
    """torch.compile traces the custom op through its fake implementation: the output is shaped like Q."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 72, 4, 128, dtype=torch.bfloat16)
        out = attention.exact_attention_hopper(q, torch.empty_like(q), torch.empty_like(q))
    assert out.shape == q.shape and out.dtype == q.dtype


def test_auto_takes_the_exact_kernel_on_hopper_where_flashattention4_is_missing():
    """Inside a whole forward the kernel beat cuDNN at 480p and 720p, and FlashAttention-4 beat it (docs/measured.md);
    a named kernel is kept, and other GPUs keep SDPA."""
    assert attention_backend("hopper", (9, 0), set()) == "hopper"
    assert attention_backend("auto", (9, 0), {"hopper", "flash3"}) == "hopper"
    assert attention_backend("auto", (9, 0), {"hopper", "flash4"}) == "flash4"
    assert attention_backend("auto", (9, 0), {"hopper"}, processes=2) == "hopper"  # its processor defers to a split
    assert attention_backend("auto", (8, 9), {"hopper"}) is None
    assert attention_backend("cudnn", (9, 0), {"hopper"}) == "_native_cudnn"


def test_the_exact_kernel_is_offered_where_it_can_run(monkeypatch):
    from wan_opt.optim import speed

    assert "hopper" not in speed.installed_attention("cpu")
    monkeypatch.setattr(speed, "hopper_kernel_available", lambda device=None: True)
    assert "hopper" in speed.installed_attention("cuda")


def test_the_exact_kernel_where_it_cannot_run_is_one_sentence(monkeypatch):
    with pytest.raises(WanOptError, match=r"attention=hopper runs wan-opt's exact attention kernel for Hopper and "
                                          r"it is built for Hopper \(compute capability 9.0\) and there is no GPU"):
        check_attention_library("hopper", "cpu")
    monkeypatch.setattr(attention, "device_capability", lambda device: (8, 9))
    with pytest.raises(WanOptError, match="this GPU is 8.9: pass hardware.speed.attention=auto"):
        check_attention_library("hopper", "cuda")
    monkeypatch.setattr(attention, "HOPPER_KERNEL", False)
    with pytest.raises(WanOptError, match="WAN_OPT_HOPPER_KERNEL=0 turns it off"):
        check_attention_library("hopper", "cuda")


def test_the_exact_kernel_on_a_hopper_gpu_passes_the_check(monkeypatch):
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper", reason="needs a Triton with Gluon")
    monkeypatch.setattr(attention, "device_capability", lambda device: (9, 0))
    check_attention_library("hopper", "cuda")

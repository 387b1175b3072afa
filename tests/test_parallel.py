"""Several processes (gloo on the CPU, as torchrun starts them): the split result equals the single-process one."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from tests.gloo import as_torchrun_rank, free_port
from wan_opt.errors import WanOptError
from wan_opt.hardware import infer_profile, load_profiles
from wan_opt.parallel import Layout, plan_layout

ROOT = Path(__file__).resolve().parent.parent
CALL = dict(prompt="a red fox in the snow", negative_prompt="blurry, static", height=64, width=96, num_frames=9,
            num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=3.0, output_type="np")
PARALLEL = OmegaConf.create({"gpus": 1, "sequence": "ulysses", "cfg_parallel": True, "shard": False})


def layout(world, guided=True, heads=40, tokens=75_600, **knobs):
    return plan_layout(world, OmegaConf.merge(PARALLEL, knobs), heads, tokens, guided, "wan22_t2v_a14b")


def test_eight_gpus_run_the_branches_on_two_groups_of_four():
    assert layout(8) == Layout(world=8, cfg=2, ring=1, ulysses=4, shard=False)
    assert layout(8, guided=False) == Layout(8, 1, 1, 8, False)  # the distilled preset has one branch
    assert layout(8, cfg_parallel=False, sequence="ring") == Layout(8, 1, 8, 1, False)
    assert layout(2) == Layout(2, 2, 1, 1, False)


def test_a_ulysses_degree_that_does_not_divide_the_heads_is_named():
    with pytest.raises(WanOptError, match="40 attention heads across 3 GPUs.*sequence=ring"):
        layout(3)
    with pytest.raises(WanOptError, match="24 attention heads across 5 GPUs"):
        layout(5, heads=24, tokens=75_600 * 5)


def test_tokens_that_do_not_split_evenly_are_named():
    with pytest.raises(WanOptError, match="do not split evenly across 4 GPUs"):
        layout(8, tokens=75_602)


def test_a_torchrun_group_gets_its_multi_gpu_profile():
    profiles = load_profiles()
    assert infer_profile("NVIDIA H100 80GB HBM3", 79.2, (9, 0), profiles, gpus=8).profile == "h100x8"
    assert infer_profile("NVIDIA H200", 139.8, (9, 0), profiles, gpus=8).profile == "h200x8"
    assert infer_profile("NVIDIA A100-SXM4-80GB", 79.2, (8, 0), profiles, gpus=8).profile == "a100_80gbx8"
    # No profile is written for two H100s: the single-GPU one, whose parallel defaults split the work.
    assert infer_profile("NVIDIA H100 80GB HBM3", 79.2, (9, 0), profiles, gpus=2).profile == "h100"
    assert infer_profile("NVIDIA H100 80GB HBM3", 79.2, (9, 0), profiles).profile == "h100"


def test_the_planner_divides_activations_and_sharded_weights_per_gpu(monkeypatch):
    from wan_opt.prepare import compose_config
    from wan_opt.prepare import plan_for

    base = ["model=wan22_t2v_a14b", "hardware.memory.host_ram_gb=512"]
    single, _ = plan_for(compose_config(base, hardware="h100"), [])
    monkeypatch.setenv("WORLD_SIZE", "8")
    split, _ = plan_for(compose_config(base, hardware="h100x8"), [])
    sharded, _ = plan_for(compose_config([*base, "hardware.parallel.shard=true"], hardware="h100x8"), [])
    gain = single.stages["denoise_high_noise"] - split.stages["denoise_high_noise"]
    assert gain == pytest.approx(0.75 * 1e-4 * 75_600, rel=0.05)  # three quarters of the activations
    assert sharded.stages["denoise_high_noise"] < split.stages["denoise_high_noise"] - 40  # 7/8 of the experts


def test_a_released_text_encoder_is_planned_whole_under_fsdp2(monkeypatch):
    """Measured on 4 H200s (gpus_720p_h200x4/e2e_wan22_t2v_a14b_a100_40gb_cap40_4gpus_cfg2_ulysses2_fsdp.json): a
    quarter of the experts per GPU plus the whole encoder while it encodes; only an encoder kept on the GPUs is
    sharded (docs/measured.md, 'Several GPUs')."""
    from wan_opt.prepare import compose_config
    from wan_opt.prepare import plan_for

    monkeypatch.setenv("WORLD_SIZE", "4")
    base = ["model=wan22_t2v_a14b", "size=1280*720", "hardware.memory.host_ram_gb=512", "hardware.parallel.shard=true",
            "hardware.memory.experts=resident"]
    released, _ = plan_for(compose_config([*base, "hardware.memory.text_encoder=gpu_release"],
                                                 hardware="a100_40gb"), [])
    kept, _ = plan_for(compose_config([*base, "hardware.memory.text_encoder=gpu"], hardware="a100_40gb"), [])
    assert released.stages["encode"] == pytest.approx(24.69, rel=0.05)
    assert kept.stages["encode"] < released.stages["encode"] - 7  # 3/4 of the encoder stays elsewhere


# ---------------------------------------------------------------------------------------------- gloo runs

def _worker(rank: int, world: int, port: int, knobs: dict, out: str) -> None:
    as_torchrun_rank(rank, world, port)
    from diffusers import WanPipeline

    from wan_opt import parallel
    from wan_opt.pipeline import WanOptPipeline
    from wan_opt.loading.tiny import build_tiny_components

    device = parallel.init("cpu")
    pipe = WanOptPipeline.from_diffusers(WanPipeline(**build_tiny_components(seed=1), boundary_ratio=0.875))
    knobs = dict(knobs)
    if knobs.pop("compiled", False):  # the profiles' regional compile, traced by dynamo (no kernels: eager backend)
        for expert in pipe.experts():
            expert.compile_repeated_blocks(fullgraph=True, dynamic=False, backend="eager")
    split = plan_layout(world, OmegaConf.merge(PARALLEL, knobs), 2, 3 * 4 * 6, True, "tiny")
    parallel.apply(pipe, split, parallel.build_mesh(split, device))
    frames = pipe(**CALL, generator=torch.Generator().manual_seed(3)).frames
    np.save(f"{out}.{rank}.npy", frames)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def single_process_frames():
    from diffusers import WanPipeline

    from wan_opt.pipeline import WanOptPipeline
    from wan_opt.loading.tiny import build_tiny_components

    pipe = WanOptPipeline.from_diffusers(WanPipeline(**build_tiny_components(seed=1), boundary_ratio=0.875))
    return pipe(**CALL, generator=torch.Generator().manual_seed(3)).frames


@pytest.mark.parametrize("knobs", [
    {"cfg_parallel": True},                                   # the two branches on two processes
    {"cfg_parallel": False},                                  # Ulysses: the tokens split in two
    {"cfg_parallel": False, "shard": True},                   # Ulysses over FSDP2-sharded experts
    {"cfg_parallel": False, "compiled": True},                # Ulysses with regionally compiled blocks
], ids=["cfg-parallel", "ulysses", "ulysses+fsdp2", "ulysses+compile"])
def test_two_processes_give_the_single_process_video(knobs, single_process_frames, tmp_path):
    mp.spawn(_worker, args=(2, free_port(), knobs, str(tmp_path / "frames")), nprocs=2, join=True)
    for rank in range(2):
        frames = np.load(tmp_path / f"frames.{rank}.npy")
        assert np.abs(frames - single_process_frames).max() < 1e-5, rank


def test_four_processes_split_both_ways(single_process_frames, tmp_path):
    """Two guidance halves of two Ulysses ranks each: the layout of h100x8, at a size a CPU runs."""
    mp.spawn(_worker, args=(4, free_port(), {"cfg_parallel": True}, str(tmp_path / "frames")), nprocs=4, join=True)
    frames = np.load(tmp_path / "frames.3.npy")
    assert np.abs(frames - single_process_frames).max() < 1e-5


@pytest.mark.slow
def test_torchrun_writes_one_video_from_rank_0(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), str(ROOT / "run.py"), "hardware=cpu", "model=tiny", "prompt=a red fox",
               "steps=2", "size=96*64", "frames=9", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    videos = list((tmp_path / "run").glob("*.mp4"))
    assert len(videos) == 1
    sidecar = json.loads(videos[0].with_suffix(".json").read_text())
    assert sidecar["parallel"] == {"world": 2, "cfg": 2, "ring": 1, "ulysses": 1, "shard": False}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # rank 1 left nothing behind


@pytest.mark.parametrize("overrides, message", [
    (["prompts=prompts.txt"], "run prompt files and sweeps in a single process"),
    (["hardware.parallel.sequence=ring", "hardware.parallel.cfg_parallel=false"], "Ring attention needs GPUs"),
    (["hardware.parallel.shard=true", "hardware.memory.experts=swap"], "keeps every expert on the GPUs"),
    (["hardware.speed.compile=full", "hardware.parallel.cfg_parallel=false"], "pass hardware.speed.compile=regional"),
])
def test_what_a_torchrun_group_cannot_do_is_said_before_loading(overrides, message, monkeypatch):
    from wan_opt.prepare import compose_config, prepare

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(WanOptError, match=message):
        prepare(compose_config(["model=tiny", "prompt=x", *overrides], hardware="cpu"))

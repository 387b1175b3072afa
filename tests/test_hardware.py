"""GPU detection and profile choice, against a fake NVML (no GPU needed)."""
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.fakes import MIB, FakeCard, FakeNVML
from wan_opt import hardware
from wan_opt.errors import WanOptError
from wan_opt.hardware import ProfileSpec, detect, infer_profile, load_profiles, normalize_gpu_name, visible_gpus

REPO = Path(__file__).resolve().parent.parent
H100_UUID = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
A100_UUID = "GPU-5a1d0c2e-77b3-4e0f-9b1a-3c4d5e6f7a8b"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    detect.cache_clear()
    yield
    detect.cache_clear()


@pytest.fixture
def nvml(monkeypatch):
    def install(*cards, init_error=False):
        fake = FakeNVML(list(cards), init_error)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake
    return install


@pytest.fixture
def torch_gpus(monkeypatch):
    """torch.cuda reporting these (name, MiB, capability) devices."""
    def install(*devices):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(devices))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(devices))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
            name=devices[i][0], total_memory=devices[i][1] * MIB, major=devices[i][2][0], minor=devices[i][2][1]))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (devices[i][1] * MIB, devices[i][1] * MIB))
    return install


def two_cards():
    return (FakeCard("NVIDIA A100-SXM4-40GB", 40960, (8, 0), A100_UUID),
            FakeCard("NVIDIA H100 80GB HBM3", 81559, (9, 0), H100_UUID))


def h100_with_mig():
    slots = [None, ("MIG-1b2f7c3e-0e4a-5c6d-8e9f-0a1b2c3d4e5f", 40320),  # 3g.40gb; slot 0 empty
             ("MIG-9c8d7e6f-5a4b-5c3d-9e2f-1a0b9c8d7e6f", 20096)]
    return FakeCard("NVIDIA H100 80GB HBM3", 81559, (9, 0), H100_UUID, migs=slots)


@pytest.mark.parametrize("name, mib, capability, profile, exact", [
    ("NVIDIA H100 80GB HBM3", 81559, (9, 0), "h100", True),
    ("NVIDIA H100 PCIe", 81559, (9, 0), "h100", True),
    ("NVIDIA H100 NVL", 95830, (9, 0), "h100", True),  # 94 GB: more than an H100 profile, less than an H200's
    ("NVIDIA H200", 143771, (9, 0), "h200", True),
    ("NVIDIA GH200 480GB", 97871, (9, 0), "h100", False),  # named by h200, too small for it
    ("NVIDIA A100-SXM4-80GB", 81920, (8, 0), "a100_80gb", True),
    ("NVIDIA A100-SXM4-40GB", 40960, (8, 0), "a100_40gb", True),
    ("NVIDIA A100-PCIE-40GB", 40960, (8, 0), "a100_40gb", True),
    ("NVIDIA A100 80GB PCIe", 81920, (8, 0), "a100_80gb", True),
    ("NVIDIA L40S", 46068, (8, 9), "l40s", True),
    ("NVIDIA GeForce RTX 4090", 24564, (8, 9), "rtx4090", True),
    ("NVIDIA RTX A6000", 49140, (8, 6), "rtx_a6000", True),
    ("NVIDIA RTX 6000 Ada Generation", 49140, (8, 9), "l40s", False),  # not "rtx a6000"
    # spellings: bytes from older pynvml, PCIe/PCIE, underscores, doubled spaces, hyphens
    (b"NVIDIA A100-SXM4-40GB", 40960, (8, 0), "a100_40gb", True),
    ("NVIDIA A100-PCIe-40GB", 40960, (8, 0), "a100_40gb", True),
    ("NVIDIA A100_SXM4_80GB", 81920, (8, 0), "a100_80gb", True),
    ("nvidia  H100   PCIe", 81559, (9, 0), "h100", True),
    ("NVIDIA GeForce RTX-4090", 24564, (8, 9), "rtx4090", True),
    # the 16 GB class (Ada and Blackwell), 24 GB Ampere and 32 GB Blackwell GeForce cards
    ("NVIDIA GeForce RTX 4080", 16376, (8, 9), "rtx_16gb", True),
    ("NVIDIA GeForce RTX 4080 SUPER", 16376, (8, 9), "rtx_16gb", True),
    ("NVIDIA GeForce RTX 4070 Ti SUPER", 16376, (8, 9), "rtx_16gb", True),
    ("NVIDIA GeForce RTX 5080", 16303, (12, 0), "rtx_16gb", True),
    ("NVIDIA GeForce RTX 5070 Ti", 16303, (12, 0), "rtx_16gb", True),
    ("NVIDIA GeForce RTX 3090", 24576, (8, 6), "rtx3090", True),
    ("NVIDIA GeForce RTX 3090 Ti", 24564, (8, 6), "rtx3090", True),
    ("NVIDIA GeForce RTX 5090", 32607, (12, 0), "rtx5090", True),
    ("NVIDIA RTX A5000", 24564, (8, 6), "rtx3090", False),  # no profile of its own: the nearest that fits
    # the 12 GB class: "rtx 4070" names the 4070 Ti Super too, which gets the larger profile that fits it
    ("NVIDIA GeForce RTX 4070", 12282, (8, 9), "rtx_12gb", True),
    ("NVIDIA GeForce RTX 4070 SUPER", 12282, (8, 9), "rtx_12gb", True),
    ("NVIDIA GeForce RTX 4070 Ti", 12282, (8, 9), "rtx_12gb", True),  # 12 GB: not a "4070 Ti SUPER"
    ("NVIDIA GeForce RTX 5070", 12227, (12, 0), "rtx_12gb", True),
    ("NVIDIA GeForce RTX 4080 Laptop GPU", 12282, (8, 9), "rtx_12gb", False),  # named by rtx_16gb, but 12 GB
    ("NVIDIA GeForce RTX 4070 Laptop GPU", 8188, (8, 9), "rtx_12gb", False),  # 8 GB: the smallest, with a warning
    ("NVIDIA GeForce RTX 3060", 12288, (8, 6), "rtx3090", False),  # Ampere: no fp8, so not the 12 GB profile
])
def test_real_nvml_names_get_their_profile(nvml, name, mib, capability, profile, exact):
    fake = nvml(FakeCard(name, mib, capability, H100_UUID))
    choice = detect()
    assert (choice.profile, choice.exact) == (profile, exact)
    assert choice.gpu.name == (name.decode() if isinstance(name, bytes) else name)
    assert choice.gpu.memory_gib == pytest.approx(mib / 1024)
    assert choice.gpu.source == "nvml" and choice.gpu.index == 0 and not fake.open
    assert ("matches profile" in choice.reason) == exact


@pytest.mark.parametrize("raw, normalized", [
    ("NVIDIA A100-SXM4-40GB", "a100 sxm4 40gb"),
    ("NVIDIA A100 80GB PCIe", "a100 80gb pcie"),
    ("NVIDIA GeForce RTX 4090", "geforce rtx 4090"),
    ("NVIDIA RTX 6000 Ada Generation", "rtx 6000 ada generation"),
    (" NVIDIA_H100__NVL ", "h100 nvl"),
])
def test_normalize_gpu_name(raw, normalized):
    assert normalize_gpu_name(raw) == normalized


def test_fragments_match_whole_words_only():
    profiles = [ProfileSpec("hopper141", "cuda", ("h200",), 80, 9.0), ProfileSpec("cpu", "cpu", (), 0, 0.0)]
    assert not infer_profile("NVIDIA GH200 480GB", 95.6, (9, 0), profiles).exact
    assert infer_profile("NVIDIA H200", 140.4, (9, 0), profiles).exact


def test_load_profiles_reads_every_yaml():
    profiles = {p.name: p for p in load_profiles()}
    assert set(profiles) == {"a100_40gb", "a100_80gb", "cpu", "h100", "h200", "l40s", "rtx4090", "rtx_a6000",
                             "h100x8", "h200x8", "a100_80gbx8", "rtx_16gb", "rtx_12gb", "rtx3090", "rtx5090"}
    assert {p.gpus for n, p in profiles.items() if n.endswith("x8")} == {8} and profiles["h100"].gpus == 1
    assert profiles["h200"].names == ("h200", "gh200")
    assert (profiles["l40s"].memory_gb, profiles["l40s"].capability) == (48, 8.9)
    assert profiles["cpu"].device == "cpu"


def test_user_conf_dir_adds_profiles_but_cannot_shadow_builtin(tmp_path):
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware/rtx6000ada.yaml").write_text(
        "device: cuda\ngpu: {names: ['RTX 6000 Ada'], memory_gb: 48, capability: 8.9}\n")
    (tmp_path / "hardware/h100.yaml").write_text("device: cuda\ngpu: {names: [h100], memory_gb: 1, capability: 1.0}\n")
    profiles = load_profiles([tmp_path])
    assert next(p for p in profiles if p.name == "h100").memory_gb == 80
    choice = infer_profile("NVIDIA RTX 6000 Ada Generation", 48.0, (8, 9), profiles)
    assert (choice.profile, choice.exact) == ("rtx6000ada", True)


def test_bad_gpu_block_is_one_clear_error(tmp_path):
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware/odd.yaml").write_text("gpu: {memory_gb: 80GB}\n")
    with pytest.raises(WanOptError, match="odd.yaml"):
        load_profiles([tmp_path])


def test_unknown_gpu_gets_nearest_profile_and_override_hint():
    choice = infer_profile("NVIDIA B200", 178.4, (10, 0), load_profiles())
    assert (choice.profile, choice.exact) == ("h200", False)
    assert "nearest by memory and capability" in choice.reason and "hardware=" in choice.reason


@pytest.mark.parametrize("memory_gib", [24.0, 40.0, 48.0, 80.0, 140.0])
def test_ampere_card_never_gets_a_newer_profile(memory_gib):
    profiles = load_profiles()
    for name in ("NVIDIA A800 80GB PCIe", "NVIDIA H100 80GB HBM3"):  # even a name that says Hopper
        chosen = infer_profile(name, memory_gib, (8, 0), profiles).profile
        assert next(p for p in profiles if p.name == chosen).capability <= 8.0


def test_card_too_small_for_every_profile_gets_smallest_with_warning():
    choice = infer_profile("NVIDIA GeForce RTX 4060", 8.0, (8, 9), load_profiles())
    assert (choice.profile, choice.exact) == ("rtx_12gb", False)
    assert "may not fit" in choice.reason


@pytest.mark.parametrize("name, memory_gib, capability, profile, fp8", [
    ("NVIDIA GeForce RTX 3090", 24.0, (8, 6), "rtx3090", False),  # stores fp8, computes in bf16
    ("NVIDIA GeForce RTX 5090", 31.8, (12, 0), "rtx5090", True),
    ("NVIDIA GeForce RTX 5080", 15.9, (12, 0), "rtx_16gb", True),
    ("NVIDIA GeForce RTX 4080", 16.0, (8, 9), "rtx_16gb", True),
    ("NVIDIA GeForce RTX 4070", 12.0, (8, 9), "rtx_12gb", True),
    ("NVIDIA GeForce RTX 5070", 11.9, (12, 0), "rtx_12gb", True),
])
def test_geforce_profiles_say_what_was_not_measured(name, memory_gib, capability, profile, fp8):
    from omegaconf import OmegaConf

    from wan_opt.config import CONF_DIR

    assert infer_profile(name, memory_gib, capability, load_profiles()).profile == profile
    assert hardware.has_fp8(capability) == fp8
    written = OmegaConf.load(CONF_DIR / "hardware" / f"{profile}.yaml")
    assert "not measured on" in written.description


@pytest.mark.parametrize("visible, expected", [
    ("1", ["NVIDIA H100 80GB HBM3"]),
    ("1,0", ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"]),
    ("0,7,1", ["NVIDIA A100-SXM4-40GB"]),  # an invalid entry ends the list, as in CUDA
    (H100_UUID, ["NVIDIA H100 80GB HBM3"]),
    ("GPU-8932f9", ["NVIDIA H100 80GB HBM3"]),  # a unique prefix
    ("5a1d0c2e", ["NVIDIA A100-SXM4-40GB"]),  # a prefix without "GPU-"
    (f"{A100_UUID.upper()},1", ["NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3"]),
    ("GPU-,0", []),  # ambiguous prefix: invalid
    ("", []),
    ("-1", []),
])
def test_cuda_visible_devices_selects_like_cuda(nvml, monkeypatch, visible, expected):
    nvml(*two_cards())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [g.name for g in visible_gpus()] == expected


def test_cuda_visible_devices_index_picks_the_profile(nvml, monkeypatch):
    nvml(*two_cards())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert detect().profile == "h100"
    assert detect().gpu.uuid == H100_UUID


@pytest.mark.parametrize("visible", ["", "-1"])
def test_no_visible_gpu_means_cpu(nvml, monkeypatch, visible):
    nvml(*two_cards())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    choice = detect()
    assert (choice.profile, choice.gpu, choice.reason) == ("cpu", None, "no CUDA GPU visible")


@pytest.mark.parametrize("visible", ["MIG-1b2f7c3e-0e4a-5c6d-8e9f-0a1b2c3d4e5f", "MIG-1b2f"])
def test_mig_slice_uses_its_own_memory(nvml, monkeypatch, visible):
    nvml(FakeCard("NVIDIA L40S", 46068, (8, 9), A100_UUID), h100_with_mig())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    choice = detect()
    assert choice.gpu.mig and choice.gpu.index == 1 and choice.gpu.name == "NVIDIA H100 80GB HBM3"
    assert choice.gpu.memory_gib == pytest.approx(39.375)
    assert choice.gpu.capability == (9, 0)
    # the parent's 80 GB would say h100; the 40 GB slice does not fit it
    assert (choice.profile, choice.exact) == ("a100_40gb", False)
    assert "MIG" in choice.reason and "does not fit profile h100" in choice.reason


def test_unset_visible_devices_lists_mig_slices_of_a_mig_card(nvml):
    nvml(h100_with_mig(), FakeCard("NVIDIA H100 80GB HBM3", 81559, (9, 0), "GPU-ffff"))
    gpus = visible_gpus()
    assert [(g.mig, round(g.memory_gib, 1)) for g in gpus] == [(True, 39.4), (True, 19.6), (False, 79.6)]


def test_unknown_mig_id_hides_every_gpu(nvml, monkeypatch):
    nvml(h100_with_mig())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-00000000")
    assert visible_gpus() == []


def test_local_rank_picks_the_process_gpu(nvml, monkeypatch):
    nvml(*two_cards())
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert detect().profile == "h100"
    monkeypatch.setenv("LOCAL_RANK", "2")
    detect.cache_clear()
    assert detect().profile == "cpu"


def test_unlike_gpus_without_pci_order_warn(nvml, monkeypatch):
    nvml(*two_cards())
    monkeypatch.delenv("CUDA_DEVICE_ORDER")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.warns(RuntimeWarning, match="CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        visible_gpus()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", H100_UUID)  # a UUID names one card in any order
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(visible_gpus()) == 1


def test_nvml_missing_falls_back_to_torch(monkeypatch, torch_gpus):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    torch_gpus(("NVIDIA L40S", 46068, (8, 9)))
    choice = detect()
    assert (choice.profile, choice.exact, choice.gpu.source, choice.gpu.index) == ("l40s", True, "torch", None)


def test_nvml_and_torch_missing_means_cpu(monkeypatch, torch_gpus):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    torch_gpus()
    assert (detect().profile, detect().gpu) == ("cpu", None)


def test_nvml_init_error_falls_back_to_torch(nvml, torch_gpus):
    nvml(*two_cards(), init_error=True)
    torch_gpus(("NVIDIA GeForce RTX 4090", 24564, (8, 9)))
    assert [(g.name, g.source) for g in visible_gpus()] == [("NVIDIA GeForce RTX 4090", "torch")]
    assert detect().profile == "rtx4090"


def test_nvml_error_mid_query_falls_back_and_shuts_down(nvml, monkeypatch, torch_gpus):
    fake = nvml(*two_cards())

    def gpu_lost(handle):
        raise fake.NVMLError("GPU is lost")

    monkeypatch.setattr(fake, "nvmlDeviceGetUUID", gpu_lost)
    torch_gpus()
    assert visible_gpus() == [] and not fake.open


def test_detect_is_cached(nvml):
    fake = nvml(*two_cards())
    first = detect()
    fake.cards.clear()
    assert detect() is first


def test_cli_lists_gpus_and_ends_with_profile(nvml, monkeypatch, capsys):
    nvml(*two_cards())
    monkeypatch.setenv("COLUMNS", "160")  # wide enough that rich prints each row on one line
    assert hardware.main([]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA A100-SXM4-40GB" in out and H100_UUID in out
    assert out.splitlines()[-1] == "profile: a100_40gb"


def test_cli_hypothetical_unknown_gpu_warns(capsys):
    assert hardware.main(["--name", "NVIDIA RTX 6000 Ada Generation", "--memory-gb", "48", "--capability", "8.9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("warning:") and "hardware=" in lines[-2]
    assert lines[-1] == "profile: l40s"


def test_cli_capability_defaults_to_the_named_profiles():
    # an H100 with 80 GB: sm_90 from the h100 profile; an unknown name: the oldest profile capability, sm_80
    assert hardware._default_capability("NVIDIA H100 PCIe", load_profiles()) == (9, 0)
    assert hardware._default_capability("NVIDIA B200", load_profiles()) == (8, 0)


@pytest.mark.parametrize("argv, message", [
    (["--name", "NVIDIA L40S", "--memory-gb", "-4"], "positive"),
    (["--name", "NVIDIA L40S"], "go together"),
])
def test_cli_bad_args_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        hardware.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def run_cli(*args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "wan_opt.hardware", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.slow
def test_cli_subprocess_hypothetical_gpu():
    assert run_cli("--name", "NVIDIA A100-SXM4-40GB", "--memory-gb", "40")[-1] == "profile: a100_40gb"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_cli_subprocess_without_gpu_says_cpu():
    # pynvml is installed here but no driver is: NVMLError_LibraryNotFound must fall through to torch, then cpu
    assert run_cli()[-1] == "profile: cpu"

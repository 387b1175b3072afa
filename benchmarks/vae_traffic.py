"""Bytes the VAE decode of a 720p video reads and writes outside its convolutions, with diffusers' modules and with
fuse_vae's, counted without a GPU.

The full-size VAE runs on PyTorch's meta device (shapes, no data) in float16, the Hopper profiles' decode dtype;
every operator that computes is counted as reading its inputs and writing its outputs once (views, which move
nothing, are left out). The fused norm is counted as its kernel works: each element read once and written once.
A count of memory traffic, not a time: on a GPU these passes are bound by memory bandwidth, which is what
benchmarks/vae_decode.py then measures.

    python benchmarks/vae_traffic.py

writes benchmarks/results/vae_traffic_meta.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.vae_decode import SIZES  # noqa: E402
from wan_opt.loading.arch import VAE_CONFIGS  # noqa: E402
from wan_opt.optim import vae as vae_speed  # noqa: E402

MOVES_NOTHING = {"view", "_unsafe_view", "expand", "slice", "select", "permute", "unsqueeze", "squeeze", "t",
                 "transpose", "as_strided", "detach", "alias", "unbind", "split", "split_with_sizes", "unflatten"}


class Traffic(TorchDispatchMode):
    """Bytes read and written, by operator."""

    def __init__(self):
        super().__init__()
        self.bytes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name not in MOVES_NOTHING and not name.startswith("empty"):
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
        return out


def count(family: str, fused: bool) -> dict:
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan(**VAE_CONFIGS[family]).eval()
    torch.nn.Module.to(vae, torch.float16)
    traffic = Traffic()
    if fused:
        vae_speed.fuse_vae(vae)

        def kernel(self, x):  # the Triton kernel: one read and one write of each element
            traffic.bytes["fused norm and SiLU"] += 2 * x.numel() * x.element_size()
            return torch.empty_like(x)

        vae_speed.NormSiLU.forward = kernel
    width, height, frames = SIZES[family]
    config = vae.config
    z = torch.empty(1, config.z_dim, (frames - 1) // config.scale_factor_temporal + 1,
                    height // config.scale_factor_spatial, width // config.scale_factor_spatial,
                    device="meta", dtype=torch.float16)
    with traffic, torch.no_grad():
        vae.decode(z)
    gb = {name: round(b / 1e9, 1) for name, b in traffic.bytes.most_common()}
    outside = sum(b for name, b in traffic.bytes.items() if name != "convolution")
    return {"family": family, "fused": fused, "size": f"{width}*{height} x {frames}",
            "gb_outside_convolutions": round(outside / 1e9, 1), "gb_convolutions": gb.get("convolution"),
            "gb_by_operator": gb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["t2v_a14b", "ti2v_5b"])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    original = vae_speed.NormSiLU.forward
    runs = []
    for family in args.families:
        for fused in (False, True):
            runs.append(count(family, fused))
            vae_speed.NormSiLU.forward = original
            print(f"{family}, {'fuse_vae' if fused else 'diffusers'}: {runs[-1]['gb_outside_convolutions']} GB "
                  f"outside the convolutions ({runs[-1]['gb_convolutions']} GB in them)", flush=True)
    import diffusers

    record = {"command": "python " + " ".join(sys.argv), "device": "meta (counted, no GPU)", "dtype": "float16",
              "torch": torch.__version__, "diffusers": diffusers.__version__, "runs": runs}
    path = Path(args.out) / "vae_traffic_meta.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Rebuilds the bundled MiniLM's model.safetensors on the device from the fp16 copy carried there
(the float32 original is 91 MB, over the device tool's 64 MiB carry): float tensors back to float32."""
import sys
import torch
from safetensors.torch import load_file, save_file

sd = load_file(".devcarry/minilm/model.fp16.safetensors")
save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, sys.argv[1],
          metadata={"format": "pt"})
print("MiniLM (fp16-rounded, stored as float32):", len(sd), "tensors ->", sys.argv[1])

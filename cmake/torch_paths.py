"""Prints what CMakeLists.txt needs to know about the torch of this Python, as KEY=value lines."""
import glob
import os

import torch

torch_dir = os.path.dirname(torch.__file__)
includes = [os.path.join(torch_dir, "include"), os.path.join(torch_dir, "include", "torch", "csrc", "api", "include")]
# CUDA builds of torch ship cuBLAS/cuSOLVER/cuSPARSE headers in the nvidia wheels (nvidia/cu13/include
# or nvidia/<lib>/include), not in the toolkit: ATen's CUDA headers need them.
site = os.path.dirname(torch_dir)
nvidia = sorted(set(glob.glob(os.path.join(site, "nvidia", "cu*", "include")) + glob.glob(os.path.join(site, "nvidia", "*", "include"))))

print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_CUDA_VERSION={torch.version.cuda or ''}")
print(f"TORCH_LIB_DIR={os.path.join(torch_dir, 'lib')}")
print(f"TORCH_INCLUDE_DIRS={'|'.join(includes)}")
print(f"TORCH_NVIDIA_INCLUDE_DIRS={'|'.join(nvidia)}")
print(f"TORCH_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}")

# Triton kernels run on CPU tensors under the interpreter; the variable must be set before any
# @triton.jit decorates, i.e. before longctx.kernels.*_triton is imported.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

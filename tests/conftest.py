import os
import sys

import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. Triton reads this when a kernel is
# decorated, i.e. when kernels.py is first imported, so it must be set before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

"""Parameter overhead of MKSMT's OPM heads on Swin-L (results/README.md, MKSMT section).

    python results/mksmt-cifar10subset/swin-checks/swin_l_head_params.py > results/mksmt-cifar10subset/swin-checks/swin_l_head_params.txt

Built on the meta device (no memory, no weights), K = 200 (CUB): the backbone with
its own classifier vs OPMs on S3 and S4 (stages 2 and 3) at width 216 (the default for Swin: the
paper's +1.1%), 512 (PMG's) and 128.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import models  # noqa: E402

with torch.device("meta"):
    backbone = models.count_parameters(models.build_model("swin_l", 200, image_size=224))
    for width in (216, 512, 128):
        heads = models.count_parameters(models.build_model("swin_l", 200, image_size=224, heads=[2, 3],
                                                           head_width=width))
        print(f"swin_l K=200: backbone {backbone:,} -> with OPMs on S3, S4 (width {width}) {heads:,} "
              f"({100 * (heads / backbone - 1):+.2f}%)")

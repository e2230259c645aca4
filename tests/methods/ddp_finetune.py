"""Fine-tune the plain toy denoiser (as tests/methods/test_finetune.py does) and save its weights:
run once as a plain process and once under ``torchrun --nproc-per-node 2`` by
``test_finetune.py::test_two_processes_train_the_one_process_weights``.

    python tests/methods/ddp_finetune.py OUT.pt
"""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2]))

import diffquant
from diffquant.eval.distributed import init_from_env, rank_and_world
from diffquant.methods.finetune import finetune
from tests.methods.test_finetune import FAST, INT2
from tests.test_trajectory import PlainDenoiser, my_sampler


def main() -> None:
    torch.set_num_threads(1)
    init_from_env()
    torch.manual_seed(0)
    fp = PlainDenoiser().eval()
    with diffquant.recording(fp) as trajectory:
        my_sampler(fp, n=32)
    q = diffquant.quantize(copy.deepcopy(fp), INT2, trajectory, progress=False)
    config = FAST.__class__(**{**FAST.__dict__, "iterations": 40, "batch": 7, "eval_every": 10, "lr": 1e-2})
    report = finetune(q, trajectory, config, progress=False)
    if rank_and_world()[0] == 0:
        torch.save({"state": q.state_dict(), "report": report, "world": rank_and_world()[1]}, sys.argv[1])


if __name__ == "__main__":
    main()

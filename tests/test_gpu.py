"""On a CUDA machine: NCCL collectives and the masked-position MLM head (skipped without CUDA;
the full GPU proof is launch/gpu_check.sh)."""
import socket

import pytest
import torch
import torch.distributed as dist

from models import tiny_model
from test_pretrain_features import full_head_loss, mlm_batch

pytestmark = pytest.mark.gpu


@pytest.fixture
def nccl_group():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


def test_collectives_run_on_the_gpu_under_nccl(nccl_group):
    from vp_dist.distributed.devices import collective_device
    from vp_dist.train.artifacts import RunRecord
    assert collective_device() == torch.device("cuda", 0)
    window = RunRecord._gather_window(torch.tensor(5, device="cuda"), 10)  # a CPU tensor here crashed NCCL
    assert window[0, :2].tolist() == [5.0, 10.0]


def test_masked_position_loss_equals_the_full_head_under_bf16_autocast():
    from vp_dist.train.loop import pretraining_loss
    model = tiny_model("bert-pretraining").eval().cuda()
    batch = {k: v.cuda() for k, v in mlm_batch().items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        full = full_head_loss(model, batch, "mlm")
        masked, _ = pretraining_loss(model, batch, "mlm", masked_positions_only=True)
    torch.testing.assert_close(masked, full, rtol=2e-2, atol=2e-2)

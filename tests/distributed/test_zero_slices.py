"""How a rank writes pruned rows into its slice of a flattened parameter (ZeRO partitions), alone."""
import torch

from vp_dist.distributed.zero import _write_flat


def test_slice_write_touches_exactly_the_pruned_rows_it_holds_and_never_the_padding():
    rows, width = 5, 3                                  # a [5, 3] parameter, 15 elements
    pruned = torch.tensor([False, True, False, False, True])
    values = torch.tensor([0.0, -1.0, 0.0, 0.0, -4.0], dtype=torch.float64)
    full = torch.arange(15, dtype=torch.float32)
    expected = full.reshape(rows, width).clone()
    expected[pruned] = values[pruned, None].float()
    for world in (1, 2, 3, 4):                          # partitions of ceil(15 / world), last one padded
        size = -(-15 // world)
        padded = torch.cat([full, torch.full((size * world - 15,), 99.0)])
        for rank in range(world):
            part = padded[rank * size:(rank + 1) * size].clone()
            _write_flat(part, rank * size, pruned, values, width)
            padded[rank * size:(rank + 1) * size] = part
        assert torch.equal(padded[:15].reshape(rows, width), expected), world
        assert torch.all(padded[15:] == 99.0), "padding must stay untouched"

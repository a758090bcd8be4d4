import torch

from efsolo.config import LossSettings
from efsolo.modeling.targets import assign_cells

DEFAULT_SCALE_RANGES = LossSettings().scale_ranges  # SOLO's, at 800 px


def test_square_goes_to_its_centre_cells_on_the_right_level():
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 16:48, 16:48] = True  # box 32 x 32: sqrt(area) 32 is in (1, 96) only
    cells = assign_cells(masks, (4, 4, 4, 4, 4), DEFAULT_SCALE_RANGES, sigma=0.2)
    # centre 31.5 -> cell 1; the centre region 31.5 +- 3.2 spans cells 1..2 (<= centre + 1)
    assert sorted(torch.nonzero(cells[0] >= 0).flatten().tolist()) == [5, 6, 9, 10]
    assert all((c == -1).all() for c in cells[1:])


def test_large_instance_goes_to_two_levels_and_later_overwrites():
    masks = torch.zeros(2, 256, 256, dtype=torch.bool)
    masks[0, 64:192, 64:192] = True  # 128: in (48, 192) and (96, 384)
    masks[1, 100:156, 100:156] = True  # 56, same centre: in (1, 96) and (48, 192); painted later
    cells = assign_cells(masks, (8, 8, 8, 8, 8), DEFAULT_SCALE_RANGES)
    assert set(cells[0][cells[0] >= 0].tolist()) == {1}
    assert set(cells[1][cells[1] >= 0].tolist()) == {1}  # instance 1 overwrote instance 0's cells
    assert set(cells[2][cells[2] >= 0].tolist()) == {0}
    assert (cells[3] == -1).all()


def test_no_instances():
    cells = assign_cells(torch.zeros(0, 32, 32, dtype=torch.bool), (4, 3, 2, 2, 1), DEFAULT_SCALE_RANGES)
    assert [c.shape[0] for c in cells] == [16, 9, 4, 4, 1] and all((c == -1).all() for c in cells)

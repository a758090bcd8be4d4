"""SOLO target assignment: pseudo masks to grid cells by scale range and centre region."""
from __future__ import annotations

import torch



def assign_cells(masks: torch.Tensor, grids: tuple[int, ...], scale_ranges: tuple[tuple[float, float], ...],
                 sigma: float = 0.2) -> list[torch.Tensor]:
    """Which instance each grid cell predicts, per level.

    masks: (N, H, W) binary pseudo masks at input resolution (H, W: the padded input size).
    An instance goes to every level whose range holds sqrt(box area); on a level it covers the
    cells of its centre region: a box of ``sigma`` times its box size around its centre of mass,
    at most one cell either side of the centre cell. A later instance overwrites an earlier one.
    Returns per level a (S * S,) long tensor of instance indices, -1 for a negative cell.
    N = 0 gives all -1.
    """
    n, h, w = masks.shape
    out = [torch.full((s * s,), -1, dtype=torch.long, device=masks.device) for s in grids]
    if n == 0:
        return out
    m = masks.float()
    area = m.sum(dim=(1, 2))
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    rows, cols = m.amax(2) > 0, m.amax(1) > 0  # (N, H), (N, W)
    for i in range(n):
        if area[i] == 0:
            continue
        r, c = torch.nonzero(rows[i]).flatten(), torch.nonzero(cols[i]).flatten()
        y0, y1, x0, x1 = r[0].item(), r[-1].item() + 1, c[0].item(), c[-1].item() + 1
        scale = ((y1 - y0) * (x1 - x0)) ** 0.5
        cy = ((m[i].sum(1) * ys).sum() / area[i]).item()
        cx = ((m[i].sum(0) * xs).sum() / area[i]).item()
        half_h, half_w = 0.5 * (y1 - y0) * sigma, 0.5 * (x1 - x0) * sigma
        for level, (s, (lo, hi)) in enumerate(zip(grids, scale_ranges)):
            if not lo <= scale <= hi:
                continue
            ch, cw = int(cy / h * s), int(cx / w * s)
            top = max(int((cy - half_h) / h * s), ch - 1, 0)
            down = min(int((cy + half_h) / h * s), ch + 1, s - 1)
            left = max(int((cx - half_w) / w * s), cw - 1, 0)
            right = min(int((cx + half_w) / w * s), cw + 1, s - 1)
            grid = out[level].view(s, s)
            grid[top:down + 1, left:right + 1] = i
    return out

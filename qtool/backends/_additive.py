"""Additive quantization of one linear layer, after AQLM (Egiazarian et al., 2024). Written for qtool.

No maintained library quantizes to AQLM (the `aqlm` package only runs inference), so qtool
implements the per-layer algorithm here, from the paper, without code from elsewhere:

- Each output row r of W is split into groups of `in_group` consecutive input weights; a group is
  approximated by `scale[r] * sum_m codebook_m[code_{r,g,m}]` with M codebooks of 2**nbits vectors.
- The objective is the layer's output error on calibration inputs X: tr((W - W') H (W - W')^T)
  with H = X^T X / tokens (the same proxy as GPTQ/AQLM), so directions the data uses count more.
- Initialisation: per-row RMS scales, then residual k-means (codebook m clusters what codebooks
  1..m-1 left over).
- Alternating rounds of (a) beam search over codes and (b) Adam on codebooks and scales.
  The code search visits one input group at a time and, for every row at once, keeps the
  `beam` best assignments of the M codes of that group; the error of a change is computed
  exactly with H (cross-group terms through the running residual E @ H), so a round never
  increases the objective.

Tensors follow the `aqlm` package layout: codes [out, in/in_group, M], codebooks
[M, 2**nbits, 1, in_group], scales [out, 1, 1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AqSettings:
    codebooks: int = 2
    nbits: int = 8
    in_group: int = 8
    rounds: int = 3  # (beam search, Adam) rounds
    beam: int = 4
    adam_steps: int = 40
    lr: float = 1e-3
    kmeans_iters: int = 12


@dataclass
class AqLayer:
    codes: torch.Tensor  # [out, groups, M] int64 (0 .. 2**nbits - 1)
    codebooks: torch.Tensor  # [M, K, in_group]
    scales: torch.Tensor  # [out]

    def weight(self) -> torch.Tensor:
        return reconstruct(self.codes, self.codebooks, self.scales)


def reconstruct(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W' [out, in] = scale[r] * sum_m codebooks[m, codes[r, g, m]], groups laid side by side."""
    out, groups, m = codes.shape
    parts = [codebooks[i][codes[:, :, i]] for i in range(m)]  # each [out, groups, in_group]
    return (torch.stack(parts).sum(0) * scales[:, None, None]).reshape(out, -1)


def objective(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """tr((W - W') H (W - W')^T): the output error on the calibration inputs, summed over rows."""
    e = w - w_hat
    return ((e @ h) * e).sum()


def kmeans(points: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means: (centroids [k, d], assignment [n]). Empty clusters take random points."""
    n = points.shape[0]
    centroids = points[torch.randperm(n, generator=generator)[:k]].clone()
    if centroids.shape[0] < k:  # fewer points than codes: pad with jittered copies
        extra = centroids[torch.randint(0, centroids.shape[0], (k - centroids.shape[0],), generator=generator)]
        centroids = torch.cat([centroids, extra + 1e-3 * torch.randn(extra.shape, generator=generator)])
    norms = (points * points).sum(1, keepdim=True)
    for _ in range(iters):
        assign = _nearest(points, norms, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).to(points.dtype)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            centroids[empty] = points[torch.randint(0, n, (int(empty.sum()),), generator=generator)]
    return centroids, _nearest(points, norms, centroids)


def _nearest(points: torch.Tensor, norms: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    cn = (centroids * centroids).sum(1)
    return torch.cat([(cn - 2 * points[i : i + chunk] @ centroids.T).argmin(1) for i in range(0, points.shape[0], chunk)])


def initialise(w: torch.Tensor, s: AqSettings, generator: torch.Generator) -> AqLayer:
    out, n_in = w.shape
    scales = w.pow(2).mean(1).sqrt().clamp(min=1e-8)
    residual = (w / scales[:, None]).reshape(-1, s.in_group)
    books, codes = [], []
    for _ in range(s.codebooks):
        centroids, assign = kmeans(residual, 2**s.nbits, s.kmeans_iters, generator)
        residual = residual - centroids[assign]
        books.append(centroids)
        codes.append(assign)
    return AqLayer(torch.stack(codes, -1).reshape(out, n_in // s.in_group, s.codebooks), torch.stack(books), scales)


@torch.no_grad()
def beam_search(w: torch.Tensor, h: torch.Tensor, layer: AqLayer, beam: int) -> AqLayer:
    """Re-pick every group's codes, group by group; each row's error can only go down."""
    codes = layer.codes.clone()
    books, scales = layer.codebooks, layer.scales
    m, k, g = books.shape
    target = w / scales[:, None]  # per row the objective is scale^2 * (target - R) H (...)^T: same argmin
    e = target - reconstruct(codes, books, torch.ones_like(scales))
    p = e @ h  # running E @ H
    rows = torch.arange(w.shape[0])
    for group in range(codes.shape[1]):
        cols = slice(group * g, (group + 1) * g)
        hg = h[cols, cols]
        book_energy = torch.einsum("mkd,de,mke->mk", books, hg, books)  # c^T Hgg c, [M, K]
        start = codes[:, group, :]  # [out, M]
        old = books[torch.arange(m), start].sum(1)  # [out, g]: the group's current reconstruction
        # a hypothesis = codes for the group; d = its reconstruction minus `old`; cost = d^T Hgg d - 2 d.P_g
        hyp = start[:, None, :].clone()  # [out, B, M]
        cost = torch.zeros(w.shape[0], 1)
        for i in range(m):
            current = books[i][hyp[:, :, i]]  # [out, B, g]
            a = books[torch.arange(m), hyp].sum(2) - current - old[:, None, :]  # d without codebook i
            base = torch.einsum("rbd,de,rbe->rb", a, hg, a) - 2 * (a * p[:, None, cols]).sum(-1)
            scores = base[:, :, None] + book_energy[i][None, None, :] + 2 * ((a @ hg) - p[:, None, cols]) @ books[i].T
            best = scores.reshape(w.shape[0], -1).topk(min(beam, scores[0].numel()), dim=1, largest=False)
            parent, choice = best.indices // k, best.indices % k
            hyp = torch.gather(hyp, 1, parent[:, :, None].expand(-1, -1, m)).clone()
            hyp[:, :, i] = choice
            cost = best.values
        chosen = hyp[rows, cost.argmin(1)]  # [out, M]
        # keep the old codes where the search found nothing better (ties and float noise)
        keep = cost.min(1).values >= 0
        chosen[keep] = start[keep]
        delta = books[torch.arange(m), chosen].sum(1) - old  # [out, g]
        codes[:, group, :] = chosen
        e[:, cols] -= delta
        p -= delta @ h[cols, :]
    return AqLayer(codes, books, scales)


def adam_update(w: torch.Tensor, h: torch.Tensor, layer: AqLayer, steps: int, lr: float) -> AqLayer:
    """Adam on codebooks and scales with the codes fixed; returns the best iterate seen."""
    if steps <= 0:
        return layer
    books = layer.codebooks.clone().requires_grad_(True)
    scales = layer.scales.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([books, scales], lr=lr, betas=(0.9, 0.95))
    norm = objective(w, torch.zeros_like(w), h).clamp(min=1e-12)
    best_loss, best = float("inf"), (layer.codebooks, layer.scales)
    for _ in range(steps + 1):
        loss = objective(w, reconstruct(layer.codes, books, scales), h) / norm
        if loss.item() < best_loss:
            best_loss, best = loss.item(), (books.detach().clone(), scales.detach().clone())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return AqLayer(layer.codes, best[0], best[1])


def quantize_layer(w: torch.Tensor, h: torch.Tensor, s: AqSettings, seed: int) -> tuple[AqLayer, float]:
    """Quantize W [out, in] against H [in, in]; returns the layer and its relative output error."""
    w = w.detach().float()
    generator = torch.Generator().manual_seed(seed)
    layer = initialise(w, s, generator)
    for _ in range(s.rounds):
        layer = beam_search(w, h, layer, s.beam)
        layer = adam_update(w, h, layer, s.adam_steps, s.lr)
    with torch.no_grad():
        error = objective(w, layer.weight(), h) / objective(w, torch.zeros_like(w), h).clamp(min=1e-12)
    return layer, float(error)


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Codes as the aqlm package stores them: signed ints of the smallest width (int8 for 8 bits)."""
    dtype = torch.int8 if nbits <= 8 else torch.int16 if nbits <= 16 else torch.int32
    shifted = torch.where(codes >= 2 ** (nbits - 1), codes - 2**nbits, codes)
    return shifted.to(dtype)


def unpack_codes(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    return packed.to(torch.int64) % (2**nbits)

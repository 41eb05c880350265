"""Per-sequence gradient factors of one use of a parameter, and their inner products.

A layer's per-sequence gradient is kept in one of four forms (:class:`Factor`):

- ``outer``: ``grad_i = sum_t left[i, t] (x) right[i, t]`` (outer products of rows, flattened),
  e.g. a linear layer ``y = W a``: ``left = g`` (output gradient rows), ``right = a`` (inputs).
  Then ``<grad_i, grad_j> = sum_{t, s} (left_i[t] . left_j[s]) (right_i[t] . right_j[s])``:
  the sum of the elementwise product of two Gram matrices, cost ``T_i T_j (P + Q)`` per pair
  instead of ``P Q`` memory per sequence ("ghost" products);
- ``onehot``: ``left[i, t]`` is the one-hot row of token ``ids[i, t]`` (embeddings), so
  ``left_i[t] . left_j[s] = [ids_i[t] == ids_j[s]]``;
- ``grouped``: rows labelled by a block ``ids[i, t]`` of a stacked parameter (E, P, Q), e.g. the
  expert that row t went to: ``grad_i = sum_t e_{ids[i, t]} (x) left[i, t] (x) right[i, t]``,
  so ``<grad_i, grad_j> = sum_{t, s} [ids_i[t] == ids_j[s]] (left_i[t] . left_j[s])
  (right_i[t] . right_j[s])``: the outer form's Gram products with a same-block mask;
- ``dense``: the materialized per-sequence gradient ``vec[i]`` (N, numel); or ``deferred``, a
  dense gradient ``make(*inputs)`` not computed yet, so that the recorder can compute those of
  several layers in one call (e.g. every norm layer's ``sum_t g_t * x_hat_t``).

Two uses of one parameter (tied weights, modules called twice) must orient their factors alike
(``left`` along the same axis of the weight), so that their cross terms
``<grad of use u on i, grad of use v on j>`` are inner products of the same flattened vectors.
Products are formed in the factors' precision (at least float32) and summed in float64 (a
long dense vector's products in blocks of ``SUM_BLOCK`` first: :func:`dense_dot`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MATERIALIZE_BYTES = 256 * 2**20  # largest per-layer block of materialized per-sequence gradients
MATERIALIZE_RATIO = 1.2  # materialize below this P Q / (T (P + Q)) (see materialize)
SUM_BLOCK = 4096  # dense products: summed in their precision within blocks, then in float64

Index = slice | Tensor  # rows of the per-sequence factors: a range, or (K,) long indices


@dataclass(frozen=True)
class Factor:
    """One use of a parameter as per-sequence factors (see the module docstring); build it with
    :meth:`outer`, :meth:`onehot`, :meth:`grouped` or :meth:`dense`."""

    left: Tensor | None = None
    ids: Tensor | None = None
    right: Tensor | None = None
    vec: Tensor | None = None
    make: Callable[..., Tensor] | None = None
    inputs: tuple[Tensor, ...] = ()

    @classmethod
    def outer(cls, left: Tensor, right: Tensor) -> Factor:
        """``grad_i = sum_t left[i, t] (x) right[i, t]``; ``left`` (N, T, P), ``right``
        (N, T, Q)."""
        return cls(left=left, right=right)

    @classmethod
    def onehot(cls, ids: Tensor, right: Tensor) -> Factor:
        """``grad_i = sum_t e_{ids[i, t]} (x) right[i, t]``; ``ids`` (N, T) long."""
        return cls(ids=ids, right=right)

    @classmethod
    def grouped(cls, ids: Tensor, left: Tensor, right: Tensor) -> Factor:
        """``grad_i = sum_t e_{ids[i, t]} (x) left[i, t] (x) right[i, t]`` for a parameter of
        stacked (P, Q) blocks; ``ids`` (N, T) long block indices, ``left`` (N, T, P), ``right``
        (N, T, Q)."""
        return cls(left=left, ids=ids, right=right)

    @classmethod
    def dense(cls, vec: Tensor) -> Factor:
        """``grad_i = vec[i]``; ``vec`` (N, numel)."""
        return cls(vec=vec)

    @classmethod
    def deferred(cls, make: Callable[..., Tensor], *inputs: Tensor) -> Factor:
        """``grad_i = make(*inputs)[i]``, computed by :meth:`resolved`. ``make`` maps inputs
        with any number of leading axes to per-sequence vectors with the same leading axes
        (``(..., N, T, D) -> (..., N, numel)``), so that the deferred factors of several layers
        with equal ``make`` (hashable: e.g. a frozen dataclass) and input shapes can be computed
        in one call on their stacked inputs."""
        return cls(make=make, inputs=inputs)

    def resolved(self) -> Factor:
        """A deferred factor computed (dense); any other returned as is."""
        return self if self.make is None else Factor.dense(self.make(*self.inputs))

    def select(self, rows: Index) -> Factor:
        """The factor of sequences ``rows`` only."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else take(t, rows)

        return Factor(
            pick(self.left),
            pick(self.ids),
            pick(self.right),
            pick(self.vec),
            self.make,
            tuple(take(t, rows) for t in self.inputs),
        )

    def trimmed(self) -> Factor:
        """The factor without the positions whose term is zero in every sequence (an outer
        factor's positions where ``left`` or ``right`` is zero in all rows, a one-hot factor's
        where ``right`` is): the same gradients, and cheaper products with them (e.g. the
        padding of a larger batch, kept for a few of its sequences). Dense and deferred factors
        are returned as they are."""
        if self.right is None or (self.left is None and self.ids is None):
            return self
        live = self.right.flatten(2).abs().amax((0, 2)) > 0
        if self.left is not None:
            live &= self.left.flatten(2).abs().amax((0, 2)) > 0
        if bool(live.all()):
            return self
        pos = live.nonzero().flatten()

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(1, pos)

        return Factor(cut(self.left), cut(self.ids), cut(self.right))

    @property
    def is_outer(self) -> bool:
        return self.left is not None and self.ids is None

    @property
    def is_grouped(self) -> bool:
        return self.left is not None and self.ids is not None


def gram(x: Tensor, y: Tensor) -> Tensor:
    """(B, T, D) x (B, S, D) -> (B, T, S) row products ``x[b] y[b]^T``."""
    return torch.bmm(x, y.transpose(1, 2))


def acc_dtype(t: Tensor) -> torch.dtype:
    """float64 for sums, float32 on MPS (which has no float64)."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def dense_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_d a[..., d] * b[..., d]`` in float64 (:func:`acc_dtype`): the products in the
    inputs' precision; on a CPU summed in that precision within blocks of ``SUM_BLOCK`` and in
    float64 across them. The same accuracy as float64 throughout, up to the blocks' own
    rounding (a few units of float32's ``2^-24`` relative to the block's sum of magnitudes),
    at the cost of the products alone: there, converting every product to float64 costs ten
    times the products (measured: 27 ms against 2.5 for 8 x 884736 values), which made long
    materialized gradients slow. Elsewhere (unmeasured) one float64 sum, fewer operations."""
    acc = acc_dtype(a)
    prod = a * b
    cut = prod.shape[-1] - prod.shape[-1] % SUM_BLOCK
    if cut == 0 or prod.dtype == acc or prod.device.type != "cpu":
        return prod.sum(-1, dtype=acc)
    blocks = prod[..., :cut].unflatten(-1, (-1, SUM_BLOCK)).sum(-1)
    return blocks.sum(-1, dtype=acc) + prod[..., cut:].sum(-1, dtype=acc)


def as_index(idx: Tensor) -> Index:
    """A contiguous ascending range as a slice (a view, no copy), anything else as is."""
    if len(idx) > 0 and torch.equal(idx, torch.arange(int(idx[0]), int(idx[0]) + len(idx))):
        return slice(int(idx[0]), int(idx[0]) + len(idx))
    return idx


def take(t: Tensor, idx: Index) -> Tensor:
    """Rows ``idx`` of ``t``."""
    return t[idx] if isinstance(idx, slice) else t.index_select(0, idx.to(t.device))


def _check_grouped(u: Factor, v: Factor) -> None:
    if u.is_grouped != v.is_grouped:
        raise TypeError("cannot mix grouped and other uses of one parameter")


def _left_gram(u: Factor, v: Factor, ii: Index, jj: Index) -> Tensor:
    """(K, T, S) products of the left rows of ``u`` on sequences ``ii`` and ``v`` on ``jj``."""
    _check_grouped(u, v)
    if u.ids is not None and v.ids is not None:
        same = (take(u.ids, ii)[:, :, None] == take(v.ids, jj)[:, None, :]).to(u.right.dtype)
        return same * gram(take(u.left, ii), take(v.left, jj)) if u.is_grouped else same
    if u.ids is None and v.ids is None:
        return gram(take(u.left, ii), take(v.left, jj))
    if u.ids is not None:  # one-hot x dense: read the dense rows at the token ids
        return _left_gram(v, u, jj, ii).transpose(1, 2)
    idx = take(v.ids, jj)[:, None, :].expand(-1, u.left.shape[1], -1)
    return torch.gather(take(u.left, ii), 2, idx)


def factor_inner(u: Factor, v: Factor, ii: Index, jj: Index) -> Tensor:
    """(K,) inner products ``<grad of use u on sequence ii[k], grad of use v on sequence jj[k]>``
    (accumulated in float64)."""
    u, v = u.resolved(), v.resolved()
    if u.vec is not None or v.vec is not None:
        if u.vec is None or v.vec is None:
            raise TypeError("cannot mix materialized and factored uses of one parameter")
        return dense_dot(take(u.vec, ii), take(v.vec, jj))
    prod = _left_gram(u, v, ii, jj) * gram(take(u.right, ii), take(v.right, jj))
    return prod.sum((1, 2), dtype=acc_dtype(prod))


def _rows(t: Tensor) -> Tensor:
    """(N, T, D) rows stacked as (N T, D)."""
    return t.reshape(-1, t.shape[-1])


def _left_grid(u: Factor, v: Factor) -> Tensor:
    """(N_u T, N_v S) products of every left row of ``u`` with every left row of ``v``."""
    _check_grouped(u, v)
    if u.ids is not None and v.ids is not None:
        same = (u.ids.reshape(-1, 1) == v.ids.reshape(1, -1)).to(u.right.dtype)
        return same * (_rows(u.left) @ _rows(v.left).T) if u.is_grouped else same
    if u.ids is None and v.ids is None:
        return _rows(u.left) @ _rows(v.left).T
    if u.ids is not None:  # one-hot x dense: the dense rows read at the token ids
        return _left_grid(v, u).T
    return _rows(u.left)[:, v.ids.reshape(-1)]


def factor_grid(u: Factor, v: Factor) -> Tensor:
    """(N_u, N_v) inner products ``<grad of use u on sequence i, grad of use v on sequence j>``
    for EVERY i of ``u`` and j of ``v`` (accumulated in float64); the two uses of one parameter
    may come from different forwards. One product of all stacked rows per side instead of one
    per pair: ``sum_{t, s} (left_i[t] . left_j[s]) (right_i[t] . right_j[s])`` read off the
    (N_u T, N_v S) block products, the same terms as :func:`factor_inner` on the
    ``N_u N_v`` index pairs."""
    u, v = u.resolved(), v.resolved()
    if u.vec is not None or v.vec is not None:
        if u.vec is None or v.vec is None:
            raise TypeError("cannot mix materialized and factored uses of one parameter")
        dtype = acc_dtype(u.vec)
        return u.vec.to(dtype) @ v.vec.to(dtype).T
    n_u, t = u.right.shape[:2]
    n_v, s = v.right.shape[:2]
    prod = _left_grid(u, v) * (_rows(u.right) @ _rows(v.right).T)
    return prod.reshape(n_u, t, n_v, s).sum((1, 3), dtype=acc_dtype(prod))


def factor_dot(u: Factor, direction: Tensor) -> Tensor:
    """(N,) inner products ``<grad_i, v>`` of each sequence's gradient of use ``u`` with one
    direction ``v`` of the parameter (its own shape), accumulated in float64:

    - outer: ``<sum_t l_t (x) r_t, V> = sum_t l_t^T V r_t`` (``V`` the parameter as a
      (P, Q) matrix), the per-sequence sum of ``(l V) * r``;
    - onehot: ``sum_t V[id_t] . r_t``;
    - grouped: ``sum_t l_t^T V[id_t] r_t`` (``V`` as (E, P, Q) blocks; the rows of each block
      multiplied by it in one product);
    - dense: ``vec_i . v``.

    The products are formed in the factors' precision and on their device (``v`` moved to
    them), which costs one multiplication of the rows by ``V``, as a forward of the layer
    does."""
    u = u.resolved()
    if u.vec is not None:
        return dense_dot(u.vec, direction.reshape(-1).to(u.vec))
    if u.is_grouped:
        return _grouped_dot(u, direction)
    if u.ids is not None:
        rows = direction.reshape(-1, u.right.shape[2]).to(u.right)[u.ids]
        prod = rows * u.right
        return prod.sum((1, 2), dtype=acc_dtype(prod))
    v = direction.reshape(u.left.shape[2], u.right.shape[2]).to(u.left)
    prod = (u.left @ v) * u.right
    return prod.sum((1, 2), dtype=acc_dtype(prod))


def _grouped_dot(u: Factor, direction: Tensor) -> Tensor:
    """``sum_t l_t^T V[id_t] r_t`` per sequence of a grouped factor ``u``."""
    (n, t, p), q = u.left.shape, u.right.shape[2]
    blocks = direction.reshape(-1, p, q).to(u.left)
    ids, left, right = u.ids.reshape(-1), u.left.reshape(-1, p), u.right.reshape(-1, q)
    prod = torch.zeros_like(right)
    for block in ids.unique().tolist():
        rows = (ids == block).nonzero().flatten()
        prod[rows] = (left[rows] @ blocks[block]) * right[rows]
    return prod.reshape(n, t, q).sum((1, 2), dtype=acc_dtype(prod))


def materialize(u: Factor) -> Factor:
    """``u`` (outer) as per-sequence gradients when that is cheaper and fits in memory, else
    ``u`` (any other factor, a grouped or deferred one included, as is).

    For N = 2B sequences of T rows and 3 products per pair, materializing costs about
    ``2 N T P Q`` flops and the Gram products ``6 B T^2 (P + Q)``: equal at ``P Q / (T (P +
    Q)) = 1.5``. The Gram side's small batched products run at a lower rate than the one large
    product that materializes, so the faster side changes lower: measured on a 2-core CPU (8
    pairs, SmolLM2's layer shapes, each side timed alone with the recorder's pair products),
    at about 1.3 for 576 x 576, 1.2 for 192 x 576 and 1.1 for 1536 x 576 (there the Gram side
    took 41 ms and the materialized 57 at 1.46). Writing the N P Q values costs more per
    sequence the more sequences there are: with 2 pairs the 1536-wide layers are even at 1.46.
    Materialize below :data:`MATERIALIZE_RATIO` when the (N, P Q) block stays under
    ``MATERIALIZE_BYTES``. (A training step at 287 positions with 2 pairs took the same time
    under 1.2 as under the earlier 1.5, chosen for a Gram side of four products a pair.)
    """
    if not u.is_outer:
        return u
    n, t, p = u.left.shape
    q = u.right.shape[2]
    fits = n * p * q * u.left.element_size() <= MATERIALIZE_BYTES
    if fits and p * q < MATERIALIZE_RATIO * t * (p + q):
        return Factor.dense(torch.einsum("ntp,ntq->npq", u.left, u.right).reshape(n, p * q))
    return u

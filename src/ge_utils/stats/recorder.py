"""The recorder: hooks on the modules that own the parameter set, and the accumulation of the
inner products of their per-sequence gradient factors (:mod:`ge_utils.stats.layers` says what
each layer's factors are; :mod:`ge_utils.stats.factors` how two factors multiply).

For parameters used once, each layer's contribution is reduced in its backward hook, so memory
stays bounded by one layer's factors; or, with ``group > 1`` (the default off the CPU), once
``group`` layers of the same shapes have been recorded, in one batched product per Gram matrix
for all of them (fewer kernel launches, those layers' rows held meanwhile). A parameter used
several times in one forward (tied input/output embeddings, a module called twice) keeps its
factors until :meth:`results`, which adds every cross term ``<grad of use u, grad of use v>``:
the per-sequence gradient is the sum over its uses. Layers fed the same input (q, k, v; gate,
up) share its Gram matrix.

Forward hooks of the user's that change a module's output, and gradient checkpointing
(reentrant or not), are handled: the recorder's hook runs first and sees the module's own
output, and a second backward through a recomputed or retained graph records nothing twice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import ge_utils.stats.layers as layers
from ge_utils.logprobs import SequenceBatch, target_positions
from ge_utils.stats.factors import (
    Factor,
    Index,
    acc_dtype,
    as_index,
    dense_dot,
    factor_dot,
    factor_inner,
    take,
)
from ge_utils.stats.factors import materialize as _materialize
from ge_utils.stats.params import ParamSpec, parameter_set
from ge_utils.stats.record import PAIR_KEYS, PairStats

TINY_COEFFICIENT = 1e-12  # |dLoss/du_i| below this: sequence i's unit statistics are NaN
PAIR_BLOCKS = "<pair blocks>"  # the Gram key of expect_pairs's targets (see _gram_rows)
UNSUPPORTED_HINT = (
    "; leave its parameters out of the set (params=...) or register a rule for the module "
    "(ge_utils.stats.layers)"
)
DEVICE_GROUP = 16  # layers reduced together by default on a GPU (or any device but the CPU)
Node = torch.autograd.graph.Node
GradientEdge = torch.autograd.graph.GradientEdge


class GhostRecorder:
    """Records per-sequence factors of every use of the parameter set during one forward and
    backward, then returns inner products of per-sequence gradients.

    Usage: construct with ``batch`` (the N sequences of the forward; hooks are registered; with
    an even N, chosen rows first, the pair products are expected), run the forward,
    back-propagate (:meth:`backward`, or the caller's own ``loss.backward()`` with
    ``keep_outputs=False``), read :meth:`results` or :meth:`pair_stats`. Other products can be
    named with :meth:`expect` before the backward.

    The backward may be of any ``sum_i c_i f_i`` (e.g. a training loss, ``c_i = dLoss/du_i``):
    since every statistic is bilinear in the output gradients, :meth:`pair_stats` divides by
    ``c_i c_j`` to recover those of the unit gradients ``grad f_i``. A sequence with
    ``|c_i| < TINY_COEFFICIENT`` carries no usable gradient in that backward: its statistics are
    NaN. With ``keep_outputs=False`` parameter gradients accumulate as usual; call
    :meth:`check_uses` on the loss before its backward to catch parameters used outside their
    modules.

    With ``keep_factors=True`` nothing is reduced and no products are expected: every use's
    factors are kept, and :meth:`directional` gives each sequence's directional derivative
    ``grad f_i . v`` along any direction ``v`` of the parameters, known after the backward.
    :meth:`keep_rows` keeps the factors of some sequences only, while the statistics are
    reduced as usual (e.g. a few pairs of a training batch, followed across the optimizer step).

    ``group``: how many layers are reduced together. Each layer's Gram products take a dozen or
    so small operations, as many kernel launches on a GPU, where a small model's statistics are
    bound by launches rather than flops. With ``group=k`` the factors of a layer are held until
    k layers with factors of the same shapes (e.g. every ``q_proj``) have been recorded, and
    each Gram matrix of all of them is then one batched product: about k times fewer
    launches for the reductions, for the memory of those layers' rows and one copy of them
    (stacking). Default (None): 1 on the CPU (each layer reduced in its backward hook: least
    memory, and there the copies cost more than the saved calls), :data:`DEVICE_GROUP` on any
    other device. The result does not depend on ``group`` beyond rounding.
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamSpec = None,
        keep_outputs: bool = True,
        batch: SequenceBatch | None = None,
        keep_factors: bool = False,
        group: int | None = None,
    ):
        if group is not None and (type(group) is not int or group < 1):
            raise ValueError(f"group must be a positive integer or None, got {group!r}")
        self.group = group
        self._pending: dict[tuple, list[Factor]] = {}  # factors awaiting their group's reduction
        self.named = parameter_set(model, params)
        frozen = [n for n, p in self.named if not p.requires_grad]
        if frozen:
            raise ValueError(f"parameter(s) in the set do not require grad: {', '.join(frozen)}")
        self.names = {id(p): n for n, p in self.named}
        self.uses: dict[int, list[Factor]] = defaultdict(list)  # kept for pairwise cross terms
        self._kept: dict[int, list[Factor]] = defaultdict(list)  # the factors of kept_rows
        self._keep_index: Tensor | None = None  # the sequences keep_rows asked for
        self.targets: dict[str, tuple[Tensor, Tensor]] = {}
        self._index: dict[str, tuple[Index, Index]] = {}
        self._grid: dict[str, tuple[Index, Index]] = {}  # targets that are all pairs of a x b
        self.totals: dict[str, Tensor] = {}
        # the last Gram matrices per (target, side): the row tensors they came from, (U, K, T, S)
        self._gram_cache: dict[tuple[str | None, str], tuple[tuple[Tensor, ...], Tensor]] = {}
        self._fused: list[str] = []
        self._pairs: int | None = None  # targets are expect_pairs(B)'s: the pair-block path
        self.gram_reuses = 0  # Gram matrices shared by layers with one input (q, k, v; gate, up)
        # for backward(): the autograd edges of the recorded outputs (not the tensors, whose
        # memory autograd frees where it does not need them); off when the caller back-propagates
        self.outputs: list[GradientEdge] = []
        self.keep_outputs = keep_outputs
        self.keep_factors = keep_factors
        self.handles: list = []
        self.row_seq: Tensor | None = None
        self.n_seq: int | None = None
        self.calls: dict[int, int] = defaultdict(int)  # module id -> calls under grad
        self.param_calls: dict[int, int] = defaultdict(int)  # param id -> owning-module calls
        self.single_use: set[int] = set()  # params of modules whose rule counts their uses
        self._recorded = False
        self._busy = False  # inside a factor function that may run a module again
        owners: dict[int, int] = defaultdict(int)
        too_big = []
        for module in model.modules():
            own = {n: p for n, p in module.named_parameters(recurse=False) if id(p) in self.names}
            if not own:
                continue
            rule = layers.rule_for(module)
            if rule is None and sum(p.numel() for p in own.values()) > layers.SMALL_MODULE_NUMEL:
                too_big += [self.names[id(p)] for p in own.values()]
                continue
            factors = rule.factors if rule is not None else layers.small_module_factors
            single_use = rule is not None and rule.single_use
            if single_use:
                self.single_use |= {id(p) for p in own.values()}
            inputs = rule.inputs if rule is not None else None
            output = rule.output if rule is not None else None
            self.handles.append(
                module.register_forward_hook(  # first: it sees the module's own output
                    self._hook_for(own, factors, single_use, inputs, output),
                    with_kwargs=True,
                    prepend=True,
                )
            )
            for p in own.values():
                owners[id(p)] += 1
        if too_big:
            self.close()
            raise TypeError(
                f"fast statistics cannot handle parameter(s): {', '.join(too_big)} (owned by "
                "modules without a registered layer rule (ge_utils.stats.layers) that hold over "
                f"{layers.SMALL_MODULE_NUMEL} parameters)"
            )
        self.shared = {pid for pid, n in owners.items() if n > 1}  # e.g. tied embeddings
        if batch is not None:
            self.n_seq = len(batch)
            self.row_seq = target_positions(batch)[0]
            if len(batch) % 2 == 0:
                self.expect_pairs(len(batch) // 2)

    def _hook_for(
        self,
        own: dict[str, nn.Parameter],
        factors: layers.FactorFn,
        single_use: bool,
        inputs: layers.InputFn | None,
        pick: layers.OutputFn | None,
    ) -> Callable:
        label = ", ".join(self.names[id(p)] for p in own.values())

        def forward_hook(mod: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            if self._busy or not torch.is_grad_enabled():
                return
            whole, output = output, (pick(output) if pick is not None else output)
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"fast statistics need a tensor output from {type(mod).__name__}, which owns "
                    f"{label}{UNSUPPORTED_HINT}"
                )
            if not output.requires_grad:
                return
            x = (
                inputs(mod, args, kwargs, whole)
                if inputs
                else (args[0] if args else kwargs.get("input"))
            )
            one_input = len(args) == 1 and not kwargs
            if not isinstance(x, Tensor) or (not single_use and inputs is None and not one_input):
                raise TypeError(
                    f"fast statistics need {type(mod).__name__} (owner of {label}) to be called "
                    "with one positional tensor"
                    + ("" if single_use else " and no keyword arguments")
                    + UNSUPPORTED_HINT
                )
            self.calls[id(mod)] += 1
            for p in own.values():
                self.param_calls[id(p)] += 1
            saved = [x.detach()]  # released once used, like autograd's saved tensors

            def grad_hook(grad: Tensor) -> None:
                if saved:  # a second backward through a retained graph records nothing
                    self._record(mod, own, factors, saved.pop(), grad.detach())

            output.register_hook(grad_hook)
            if self.keep_outputs:
                self.outputs.append(torch.autograd.graph.get_gradient_edge(output))

        return forward_hook

    def _rows(self, t: Tensor) -> Tensor:
        """(N, T, D) per-sequence rows of a layer input or output gradient. 2-D rows are the
        output head applied to selected positions (one row per entry of :attr:`row_seq`:
        grouped by it and zero-padded) or every position of the batch flattened (N T rows, as
        OPT's MLP: reshaped; N from the batch or from :meth:`expect_pairs`); rows with more
        axes (a per-head norm's (N, T, heads, D), Qwen3's and Gemma3's) are flattened to
        (N, T * heads, D): a sequence's gradient sums over all."""
        if t.dim() == 3:
            return t
        if t.dim() > 3:
            return t.flatten(1, -2)
        if self.n_seq is None:
            raise RuntimeError(
                "a layer saw 2-D inputs but the recorder has no batch and no pairs (expect_pairs)"
            )
        if self.row_seq is not None and len(t) == len(self.row_seq):  # fewer targets than positions
            return group_rows(t, self.row_seq, self.n_seq)
        if len(t) % self.n_seq == 0:
            return t.reshape(self.n_seq, -1, *t.shape[1:])
        raise RuntimeError(
            f"a layer saw {len(t)} rows of 2-D inputs: neither the selected positions nor every "
            f"position of {self.n_seq} sequences"
        )

    def add_use(self, param: nn.Parameter, factor: Factor) -> None:
        """Record a use of ``param`` that no module hook sees (e.g. a fused output layer that
        reads the weight directly), as its per-sequence factors under the same backward's
        output gradients. Call before :meth:`results`."""
        if id(param) not in self.names:
            raise ValueError("add_use: the parameter is not in the recorder's parameter set")
        self._recorded = True
        self._keep(id(param), factor)
        self._add(id(param), factor)

    def _record(
        self,
        mod: nn.Module,
        own: dict[str, nn.Parameter],
        factors: layers.FactorFn,
        x: Tensor,
        grad: Tensor,
    ) -> None:
        self._recorded = True
        repeated = self.calls[id(mod)] > 1
        if x.dim() == grad.dim() - 1:  # token ids: one feature per row
            x = x[..., None]
        self._busy = True  # a factor function may run the module again (fallback, norm check)
        try:
            found = factors(mod, self._rows(x), self._rows(grad), frozenset(own))
        finally:
            self._busy = False
        for name, factor in found.items():
            pid = id(own[name])
            self._keep(pid, factor)
            if self.keep_factors:
                self.uses[pid].append(factor.resolved())
                continue
            keep = repeated or pid in self.shared
            self._add(pid, factor if keep else _materialize(factor), keep=repeated)

    def expect(self, **targets: tuple[Tensor, Tensor]) -> None:
        """Name the inner products to compute, before the backward: ``name=(ii, jj)`` asks for
        ``<grad f_ii[k], grad f_jj[k]>`` for every k (indices on any device: kept on the CPU,
        where the results are)."""
        if self._recorded:
            raise RuntimeError("expect(...) must be called before the backward")
        self.targets = {k: (ii.long().cpu(), jj.long().cpu()) for k, (ii, jj) in targets.items()}
        self._index = {k: (as_index(ii), as_index(jj)) for k, (ii, jj) in self.targets.items()}
        self._grid = {k: g for k, (ii, jj) in self.targets.items() if (g := _as_grid(ii, jj))}
        self.totals = {}
        # Several self-products (|grad f_i|^2, e.g. chosen and rejected norms) share one Gram
        # over all sequences, read at their rows: fewer, larger products.
        fused = [k for k, (ii, jj) in self.targets.items() if torch.equal(ii, jj)]
        self._fused = fused if len(fused) > 1 else []
        self._pairs = _pair_layout(self.targets)

    def keep_rows(self, rows: Tensor | list[int]) -> None:
        """Before the backward: also keep the factors of sequences ``rows`` (in that order), so
        that :meth:`kept` gives their directional derivatives along any direction known later,
        at the cost of holding their rows of every layer."""
        if self._recorded:
            raise RuntimeError("keep_rows(...) must be called before the backward")
        index = torch.as_tensor(rows, dtype=torch.long).flatten()
        if len(index) == 0 or int(index.min()) < 0:
            raise ValueError(f"keep_rows needs sequence indices >= 0, got {rows!r}")
        self._keep_index = index

    def _keep(self, pid: int, factor: Factor) -> None:
        if self._keep_index is not None:
            self._kept[pid].append(factor.select(self._keep_index).resolved().trimmed())

    def kept(self) -> KeptFactors:
        """The factors kept for directional derivatives: every sequence's (``keep_factors=True``)
        or those of :meth:`keep_rows`. They outlive :meth:`clear`."""
        if self.keep_factors:
            return KeptFactors(self.named, self.uses, self.n_seq)
        if self._keep_index is None:
            raise RuntimeError(
                "no factors kept: build the recorder with keep_factors=True or call keep_rows"
            )
        return KeptFactors(self.named, self._kept, len(self._keep_index))

    def expect_pairs(self, n_pairs: int) -> None:
        """Ask for ``norm2_chosen``, ``norm2_rejected`` and ``inner`` of sequences laid out as
        ``[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]``."""
        w = torch.arange(n_pairs)
        self.expect(
            norm2_chosen=(w, w), norm2_rejected=(w + n_pairs, w + n_pairs), inner=(w, w + n_pairs)
        )
        if self.row_seq is None:  # no batch: the pairs give the number of sequences
            self.n_seq = 2 * n_pairs

    def _add(self, pid: int, use: Factor, keep: bool = False) -> None:
        """Reduce ``use`` into the totals now, or keep it when the parameter has other uses in
        this forward (tied weights, repeated calls) whose cross terms are needed, or when every
        factor is kept (``keep_factors``)."""
        if self.keep_factors:
            self.uses[pid].append(use.resolved())
            return
        if not self.targets:
            raise RuntimeError("GhostRecorder.expect(...) must be called before the backward")
        if keep or pid in self.shared:
            self.uses[pid].append(use.resolved())
            return
        if use.ids is not None:  # one-hot or grouped (an embedding, experts): reduced now
            for key, (ii, jj) in self._index.items():
                self._accumulate(key, factor_inner(use, use, ii, jj))
            return
        rows = use.inputs or ((use.vec,) if use.vec is not None else (use.left, use.right))
        kind = (use.make, *((t.shape, t.dtype) for t in rows), rows[0].device)
        pending = self._pending.setdefault(kind, [])
        pending.append(use)
        group = self.group or default_group(rows[0].device)
        if len(pending) >= group:
            self._reduce(self._pending.pop(kind))

    def _reduce(self, uses: list[Factor]) -> None:
        """Add the products of factors of one kind and equal shapes (one or more layers) to
        the totals."""
        first = uses[0]
        if first.make is not None:  # deferred: every layer's gradients in one call
            columns = zip(*(u.inputs for u in uses), strict=True)  # each input over the layers
            vec = first.make(*(_stack(list(rows)) for rows in columns))
        else:
            vec = _stack([u.vec for u in uses]) if first.vec is not None else None
        if vec is not None:  # dense: (L, N, D) per-sequence gradients
            for key, (ii, jj) in self._index.items():
                self._accumulate(key, dense_dot(_take_rows(vec, ii), _take_rows(vec, jj)).sum(0))
            return
        if self._pairs is not None and uses[0].right.shape[0] == 2 * self._pairs:
            blocks = self._outer_inner(uses, PAIR_BLOCKS)  # (B, 3): ww, wl, ll
            self._accumulate("norm2_chosen", blocks[:, 0])
            self._accumulate("inner", blocks[:, 1])
            self._accumulate("norm2_rejected", blocks[:, 2])
            return
        if self._fused:
            per_seq = self._outer_inner(uses, None)  # (N,) every |grad f_i|^2 of these layers
            for key in self._fused:
                self._accumulate(key, take(per_seq, self._index[key][0]))
        for key in self._index.keys() - set(self._fused):
            self._accumulate(key, self._outer_inner(uses, key))

    def _outer_inner(self, uses: list[Factor], key: str | None) -> Tensor:
        """(K,) inner products, summed over ``uses`` (outer factors of equal shapes), for the
        rows of ``key`` (None: every sequence with itself); for ``PAIR_BLOCKS``, (B, 3): pair
        i's ``|grad w|^2``, ``<grad w, grad l>`` and ``|grad l|^2``."""
        left = self._grams([u.left for u in uses], key, "left")
        prod = left * self._grams([u.right for u in uses], key, "right")
        return prod.sum((-2, -1), dtype=acc_dtype(prod)).sum(0)

    def _accumulate(self, key: str, value: Tensor) -> None:
        if key in self.totals:
            self.totals[key] += value.to(self.totals[key])
        else:
            self.totals[key] = value.clone()

    def _grams(self, ts: list[Tensor], key: str | None, side: str) -> Tensor:
        """(L, K, T, S) ``gram(t[ii], t[jj])`` of each of ``ts`` (L row tensors of one shape)
        for the rows of ``key`` (None: all with themselves), computed as one batched product.
        A tensor seen by the previous call for ``(key, side)`` (same storage and shape), or
        twice in ``ts``, is multiplied once: layers fed one input (q, k, v; gate, up) share its
        Gram matrix. The cache holds those tensors, so their storage cannot be freed and
        handed to a different tensor while the entry lives."""
        held, held_grams = self._gram_cache.get((key, side), ((), None))
        fresh: list[Tensor] = []
        where: list[tuple[bool, int]] = []  # per tensor: (from the cache, its position)
        for t in ts:
            if (j := _position(held, t)) is not None:
                where.append((True, j))
            elif (j := _position(fresh, t)) is not None:
                where.append((False, j))
            else:
                fresh.append(t)
                where.append((False, len(fresh) - 1))
                continue
            self.gram_reuses += 1
        if fresh:
            computed = self._gram_rows(fresh, key)
            self._gram_cache[(key, side)] = (tuple(fresh), computed)
            if len(fresh) == len(ts):  # each tensor once, in order: no gathering
                return computed
        parts = [held_grams[j] if cached else computed[j] for cached, j in where]
        return parts[0][None] if len(parts) == 1 else torch.stack(parts)

    def _gram_rows(self, ts: list[Tensor], key: str | None) -> Tensor:
        """(U, K, T, S) Gram matrices of the rows of ``key`` of each tensor of ``ts``; for
        ``PAIR_BLOCKS`` (U, B, 3, T, T): pair i's chosen rows with themselves, with its
        rejected rows, and the rejected rows with themselves. Two batched products of views
        (every sequence with itself; chosen with rejected), no copy of the rows for one
        layer: on a CPU, copying them pair by pair into one (2T, 2T) block product cost more
        than the products (fresh memory, page faults: 2.5 ms for 2.8 MB in a training step)."""
        if key == PAIR_BLOCKS:
            x = _stack(ts, dim=1)  # (N, U, T, D): each half's (U, T, D) rows contiguous
            n, u, rows, d = x.shape
            seq = x.reshape(n, -1, d)  # (N, U T, D): a view unless the rows are strided
            flat = seq.view(-1, rows, d)
            own = torch.bmm(flat, flat.transpose(1, 2)).reshape(n, u, rows, rows)
            a, b = seq[: n // 2].view(-1, rows, d), seq[n // 2 :].view(-1, rows, d)
            cross = torch.bmm(a, b.transpose(1, 2)).reshape(n // 2, u, rows, rows)
            return torch.stack((own[: n // 2], cross, own[n // 2 :]), 2).transpose(0, 1)
        x = _stack(ts)  # (U, N, T, D)
        if key in self._grid:  # every row of a with every row of b: one product, no row copies
            a, b = (_take_rows(x, idx) for idx in self._grid[key])
            (u, n_a, rows_a, d), (_, n_b, rows_b, _) = a.shape, b.shape
            block = torch.matmul(a.reshape(u, -1, d), b.reshape(u, -1, d).transpose(1, 2))
            product = block.reshape(u, n_a, rows_a, n_b, rows_b).transpose(2, 3)
            return product.reshape(u, n_a * n_b, rows_a, rows_b)
        ii, jj = self._index[key] if key is not None else (slice(None), slice(None))
        return torch.matmul(_take_rows(x, ii), _take_rows(x, jj).transpose(2, 3))

    def results(self, scale: Tensor | None = None) -> dict[str, Tensor]:
        """The requested inner products (float64 (K,) each, on the CPU), summed over the
        parameter set; with ``scale`` (N,), the coefficients ``c`` of the backward
        ``sum_i c_i f_i``, divided by ``c[ii] * c[jj]`` (NaN where ``|c| < TINY_COEFFICIENT``)."""
        for kind in list(self._pending):
            self._reduce(self._pending.pop(kind))
        self._gram_cache.clear()
        out = {k: torch.zeros(len(ii), dtype=torch.float64) for k, (ii, _) in self.targets.items()}
        for key, total in self.totals.items():
            out[key] += total.double().cpu()
        for uses in self.uses.values():  # every pair of uses of one parameter
            for u in uses:
                for v in uses:
                    for key, (ii, jj) in self._index.items():
                        out[key] += factor_inner(u, v, ii, jj).double().cpu()
        if scale is not None:
            c = scale.detach().double().cpu()
            c = torch.where(c.abs() < TINY_COEFFICIENT, torch.nan, c)
            out = {k: v / (c[self.targets[k][0]] * c[self.targets[k][1]]) for k, v in out.items()}
        return out

    def directional(self, direction: Mapping[str, Tensor]) -> Tensor:
        """:meth:`KeptFactors.directional` of the kept factors (``keep_factors=True``, or the
        sequences of :meth:`keep_rows`)."""
        return self.kept().directional(direction)

    def pair_stats(
        self, coef_chosen: Tensor | None = None, coef_rejected: Tensor | None = None
    ) -> PairStats:
        """``norm2_chosen``, ``norm2_rejected``, ``inner`` of the unit gradients ``grad u``
        (the pairs laid out by ``batch=`` or :meth:`expect_pairs`). Without coefficients the
        backward was of ``sum_i u_i``; with them, of ``sum_i coef_chosen[i] u_w[i] +
        coef_rejected[i] u_l[i]`` (e.g. ``coef = dLoss/du``: ``-d_w / n`` and ``+d_l / n`` for a
        margin loss averaged over n pairs), which are divided out and kept in the result. NaN
        for a pair with a coefficient below ``TINY_COEFFICIENT`` in size."""
        if set(self.targets) != set(PAIR_KEYS):
            raise RuntimeError("pair_stats needs expect_pairs(...) (or batch=) before the backward")
        if (coef_chosen is None) != (coef_rejected is None):
            raise ValueError("pass both coef_chosen and coef_rejected, or neither")
        if coef_chosen is None:
            return PairStats(**self.results())
        c_w = coef_chosen.detach().flatten().double().cpu()
        c_l = coef_rejected.detach().flatten().double().cpu()
        stats = self.results(torch.cat([c_w, c_l]))
        return PairStats(**stats, coef_chosen=c_w, coef_rejected=c_l)

    def check_uses(self, value: Tensor) -> None:
        """Raise if a parameter of the set is used in the graph of ``value`` outside its own
        module (e.g. ``F.linear`` on an embedding weight, a ``ParameterDict`` read directly),
        whose gradient the hooks would miss: a parameter of a ``single_use`` rule that enters
        the graph more often than its modules ran, any other parameter whose module never ran.
        Call after the forward, before the backward."""
        edges: dict[int, int] = defaultdict(int)
        for node in _graph_nodes(value.grad_fn):
            variable = getattr(node, "variable", None)
            if variable is not None and id(variable) in self.names:
                edges[id(variable)] += 1
        calls = self.param_calls
        extra = [
            self.names[p]
            for p, n in edges.items()
            if (n > calls[p] if p in self.single_use else calls[p] == 0)
        ]
        if extra:
            raise RuntimeError(
                "parameter(s) used outside their own module (fast statistics cannot record "
                f"them): {', '.join(extra)}"
            )

    def backward(self, value: Tensor, retain_graph: bool = False) -> None:
        """Back-propagate ``value`` to the recorded layer outputs only: the hooks see every
        output gradient, and no parameter gradient is computed or stored. With
        ``retain_graph`` the forward's graph survives for a later ``loss.backward()`` (which
        then accumulates parameter gradients and records nothing)."""
        self.check_uses(value)
        outputs, self.outputs = self.outputs, []
        if outputs:  # else no parameter of the set took part: every statistic is 0
            torch.autograd.grad(
                value, _sources(outputs), allow_unused=True, retain_graph=retain_graph
            )

    def clear(self) -> None:
        """Forget everything recorded (hooks stay): ready for another forward and backward."""
        self.uses.clear()
        self._kept, self._keep_index = defaultdict(list), None  # a KeptFactors keeps the old
        self.outputs.clear()
        self.calls.clear()
        self.param_calls.clear()
        self.targets, self._index, self.totals, self._gram_cache = {}, {}, {}, {}
        self._grid, self._pending = {}, {}
        self._fused, self._pairs = [], None
        self._recorded, self.gram_reuses = False, 0

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self) -> GhostRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class KeptFactors:
    """Per-sequence gradient factors of every use of a parameter set, kept from a backward of
    ``sum_i c_i f_i`` (``uses``: parameter id -> factors of its uses, for ``n`` sequences)."""

    named: list[tuple[str, nn.Parameter]]
    uses: Mapping[int, list[Factor]]
    n: int | None

    def directional(self, direction: Mapping[str, Tensor]) -> Tensor:
        """(n,) float64 directional derivatives ``c_i grad f_i . v = sum_p sum_uses <grad_p of
        that use on sequence i, v_p>`` (CPU; ``c_i = 1`` for a backward of ``sum_i f_i``);
        ``direction`` maps each parameter's name to ``v_p`` (its shape) and is read one
        parameter at a time, so a mapping that computes ``v_p`` on access holds one of them at a
        time. Linear in the factors: the uses of a tied or repeated parameter simply add up. See
        :func:`~ge_utils.stats.factors.factor_dot`."""
        total: Tensor | None = None
        for name, p in self.named:
            uses = self.uses.get(id(p), [])
            if not uses:
                continue
            v = direction[name]
            for use in uses:
                dot = factor_dot(use, v).double().cpu()
                total = dot if total is None else total + dot
        if total is None:
            if self.n is None:
                raise RuntimeError("nothing was recorded and the recorder has no batch")
            return torch.zeros(self.n, dtype=torch.float64)
        return total


def _pair_layout(targets: Mapping[str, tuple[Tensor, Tensor]]) -> int | None:
    """B when ``targets`` are exactly those of ``expect_pairs(B)``, else None."""
    if set(targets) != set(PAIR_KEYS):
        return None
    w = torch.arange(len(targets["inner"][0]))
    b = len(w)
    expected = {"norm2_chosen": (w, w), "norm2_rejected": (w + b, w + b), "inner": (w, w + b)}
    same = all(
        torch.equal(targets[k][0], ii) and torch.equal(targets[k][1], jj)
        for k, (ii, jj) in expected.items()
    )
    return b if same and b > 0 else None


def _as_grid(ii: Tensor, jj: Tensor) -> tuple[Index, Index] | None:
    """``(a, b)`` when the targets are every ``(a[p], b[q])`` in row-major order (``ii =
    a.repeat_interleave(len(b))``, ``jj = b.repeat(len(a))``) with more than one of each, else
    None."""
    n_b = int((ii == ii[0]).sum()) if len(ii) else 0
    if n_b < 2 or len(ii) % n_b or len(ii) // n_b < 2:
        return None
    a, b = ii[::n_b], jj[:n_b]
    if torch.equal(ii, a.repeat_interleave(n_b)) and torch.equal(jj, b.repeat(len(a))):
        return as_index(a), as_index(b)
    return None


def default_group(device: torch.device) -> int:
    """Layers reduced together when the recorder is not told: 1 on the CPU, where stacking
    their rows costs more than the calls it saves, :data:`DEVICE_GROUP` elsewhere."""
    return 1 if device.type == "cpu" else DEVICE_GROUP


def _position(ts: tuple[Tensor, ...] | list[Tensor], t: Tensor) -> int | None:
    """Where ``t`` (the same storage and shape) is in ``ts``, or None."""
    return next(
        (j for j, s in enumerate(ts) if s.data_ptr() == t.data_ptr() and s.shape == t.shape),
        None,
    )


def _stack(ts: list[Tensor], dim: int = 0) -> Tensor:
    """``torch.stack(ts, dim)``; a view, not a copy, of a single tensor."""
    return ts[0].unsqueeze(dim) if len(ts) == 1 else torch.stack(ts, dim)


def _take_rows(x: Tensor, idx: Index) -> Tensor:
    """Sequences ``idx`` (dim 1) of stacked per-sequence values ``x`` (U, N, ...)."""
    return x[:, idx] if isinstance(idx, slice) else x.index_select(1, idx.to(x.device))


def group_rows(t: Tensor, row_seq: Tensor, n_seq: int) -> Tensor:
    """Rows (R, ...) of ``n_seq`` sequences, row r belonging to sequence ``row_seq[r]`` (rows of
    a sequence in order), as (n_seq, T_max, ...) zero-padded per-sequence rows."""
    seq = row_seq.to(t.device)
    counts = torch.bincount(seq, minlength=n_seq)
    slot = torch.arange(len(seq), device=t.device) - (counts.cumsum(0) - counts)[seq]
    out = t.new_zeros((n_seq, int(counts.max()) if len(seq) else 0, *t.shape[1:]))
    out[seq, slot] = t
    return out


def _sources(edges: list[GradientEdge]) -> list[GradientEdge]:
    """The recorded outputs that depend on no other recorded output (e.g. the embeddings').

    Back-propagating to these alone runs every node between the value and them, so every
    recorded output's hook fires (each recorded output depends on a source or is one), while
    autograd returns, and holds until the end of the backward, only the sources' gradients
    instead of every layer's output gradient."""
    targets = {e.node for e in edges}
    reaches: dict[Node, bool] = {}  # node -> some recorded output lies behind it

    def behind(root: Node) -> bool:
        stack, expanded = [root], set()
        while stack:  # iterative post-order: deep graphs exceed Python's recursion limit
            node = stack.pop()
            if node in reaches:
                continue
            children = [c for c, _ in node.next_functions if c is not None]
            pending = [c for c in children if c not in reaches and c not in targets]
            if pending and node not in expanded:
                expanded.add(node)
                stack.append(node)
                stack.extend(pending)
                continue
            reaches[node] = any(c in targets or reaches[c] for c in children)
        return reaches[root]

    return [e for e in edges if not behind(e.node)]


def _graph_nodes(root: Node | None) -> Iterator[Node]:
    """Every edge target reachable from ``root`` (a node reached by k edges is yielded k
    times; each node's own edges are followed once)."""
    seen: set[Node] = set()
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            yield child
            if child not in seen:
                seen.add(child)
                stack.append(child)
